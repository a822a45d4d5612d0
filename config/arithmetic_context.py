# Arithmetic with a long context, for the in-context answer CE (the metric the author's code reports):
# the model, data, tokens per step and steps of config/arithmetic.py, in windows of 256 tokens (about
# 12 OOD examples), so each scored answer follows at least 128 tokens of earlier examples.
# 3000 steps, as config/arithmetic.py: at 1500 steps (tried, experiments/README.md) the model had not
# learned the in-distribution task yet. 3000 steps take 43-47 min with one thread beside another run
# on the 2-core CPU (AMD EPYC, 2026-12-01). Use it after config/arithmetic.py, which it amends:
#   python gapt.py config/arithmetic.py config/arithmetic_context.py --mode=baseline --out_dir=out-arith-ctx-baseline-1
block_size = 256
batch_size = 16  # 16 x 256 = 64 x 64 tokens per step, as in config/arithmetic.py
