# Arithmetic OOD generalization at laptop scale (the paper's experiment (b)): train on a*b=c with
# 1-3 digit operands, report answer CE and exact match on val (1-3) and val_ood (4-6) at fixed steps.
# Two runs side by side, one thread each, take about 21 min each on the 2-core Intel Xeon VM of 2026-11-30
# and 30-31 min on the 2-core AMD EPYC VM of 2026-12-07 (40-45 min there on 2026-12-01/02, beside other jobs).
#   python prepare_data.py arithmetic
#   python gapt.py config/arithmetic.py --mode=baseline --seed=1 --out_dir=out-arith-baseline-1
#   python gapt.py config/arithmetic.py --mode=gapt --seed=1 --out_dir=out-arith-gapt-1
# Every mode sees the same data, batch and steps for a given seed: only the MBE weight differs.
dataset = "arithmetic"
device = "cpu"
compile = False
n_layer = 6  # MBE_reg: blocks 2 and 3 (mbe_skip_first = mbe_skip_last = 2)
n_head = 4
n_embd = 128
block_size = 64  # the longest val_ood example has 27 characters
batch_size = 64
gradient_accumulation_steps = 1
dropout = 0.0
learning_rate = 3e-3
warmup_iters = 100
max_iters = 3000
lr_decay_iters = 3000
min_lr = 3e-4
weight_decay = 0.1
eval_interval = 500
eval_iters = 10
log_interval = 50
align_interval = 0
answer_eval_examples = 1000
# gate patience scaled from the paper's 125 of 1750 steps (7%) to this run's length
patience_mem = 200
patience_comp = 200
