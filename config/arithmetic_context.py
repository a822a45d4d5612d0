# Arithmetic with a long context, for the in-context answer CE (the metric the author's code reports):
# the same model, data, tokens per step and steps as config/arithmetic.py, in windows of 256 tokens
# (about 12 OOD examples), so each scored answer follows at least 128 tokens of earlier examples.
# Use it after config/arithmetic.py, which it amends:
#   python gapt.py config/arithmetic.py config/arithmetic_context.py --mode=baseline --out_dir=out-arith-ctx-baseline-1
block_size = 256
batch_size = 16  # 16 x 256 = 64 x 64 tokens per step, as in config/arithmetic.py
