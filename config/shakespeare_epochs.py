# Tiny Shakespeare for many epochs, meant to reach memorization: config/shakespeare.py run for 1500
# steps of 2,048 tokens, about 10 epochs of its 298k training tokens (the paper's FineWeb run read
# its data about 2.3 times). Measured (experiments/README.md): the baseline's validation CE still falls
# at step 1500, so this is not yet the overfitting regime. Use it after config/shakespeare.py:
#   python gapt.py config/shakespeare.py config/shakespeare_epochs.py --mode=baseline --out_dir=out-shakespeare-epochs-baseline-1
max_iters = 1500
lr_decay_iters = 1500
eval_interval = 100
align_interval = 20  # 75 measurements of the cycle per run
# the gate's patience: 7% of the run, as the paper's 125 of 1750 steps
patience_mem = 105
patience_comp = 105
