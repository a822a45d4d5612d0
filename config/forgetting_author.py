# The conflicting-memories toy in the regime of the author's public code (github.com/fangyuan-ksgk/mod_gpt,
# src/forget.py CFG, conflict_exp.py EXP_CFG, src/ce_exp.py get_batch and measure_separation):
#   python -m experiments.forgetting config/forgetting_author.py --out_dir=out-forgetting-author
# Each value is theirs; what is not written here keeps our default (see experiments/README.md).
schedules = "pretrain_finetune"  # 1000 mixed pretraining steps, then 1000 fine-tuning steps on one task
n_train = 500  # EXP_CFG train_size: 500 samples per task, drawn from again and again
micro_batches = 32  # CFG accumulation_steps: 32 micro-batches of batch_size 32 per optimizer step
lr = 1e-2  # CFG lr
mbe_weight = 10.0  # CFG mbe_weight (their gapt method; their always-on "mbe" method leaves it at 1)
mbe_softness = 0.1  # CFG mbe_softness with use_softplus: a soft floor under lambda * MBE
patience_mem = 125  # CFG gapt_pm, counted in micro-batches: their gate steps once per micro-batch
patience_comp = 75  # CFG gapt_pa, likewise
gate_signal = "batch"  # every micro-batch's L1 and MBE, as their loop feeds it
n_sep_train = 32  # measure_separation: one draw of 32 + 32 training samples
