# Arithmetic with a long context, for the in-context answer CE (the metric the author's code reports):
# the model, data and tokens per step of config/arithmetic.py, in windows of 256 tokens (about 12 OOD
# examples), so each scored answer follows at least 128 tokens of earlier examples; 1500 steps.
# Use it after config/arithmetic.py, which it amends:
#   python gapt.py config/arithmetic.py config/arithmetic_context.py --mode=baseline --out_dir=out-arith-ctx-baseline-1
block_size = 256
batch_size = 16  # 16 x 256 = 64 x 64 tokens per step, as in config/arithmetic.py
max_iters = 1500
lr_decay_iters = 1500
eval_interval = 250
# the gate's patience: 7% of the run, as the paper's 125 of 1750 steps
patience_mem = 100
patience_comp = 100
