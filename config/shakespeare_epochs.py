# Tiny Shakespeare for many epochs, where the baseline memorizes: config/shakespeare.py run for 1500
# steps of 2,048 tokens, about 10 epochs of its 298k training tokens, so that the baseline's
# validation CE reaches its minimum and rises again before the end (the paper's FineWeb run read its
# data about 2.3 times). Use it after config/shakespeare.py, which it amends:
#   python gapt.py config/shakespeare.py config/shakespeare_epochs.py --mode=baseline --out_dir=out-shakespeare-epochs-baseline-1
max_iters = 1500
lr_decay_iters = 1500
eval_interval = 100
align_interval = 20  # 75 measurements of the cycle per run
# the gate's patience: 7% of the run, as the paper's 125 of 1750 steps
patience_mem = 105
patience_comp = 105
