# A quick version of a config: 600 steps, with the schedule and the gate's patience scaled to the
# run as config/arithmetic.py scales them (warmup 3%, patience 7% of the steps). Put it after the
# config it shortens; the arithmetic quick start of the README (minutes on a laptop):
#   python gapt.py config/arithmetic.py config/quick.py --mode=baseline --seed=1 --out_dir=out-quick-baseline-1
#   python gapt.py config/arithmetic.py config/quick.py --mode=gapt --seed=1 --out_dir=out-quick-gapt-1
max_iters = 600
lr_decay_iters = 600
warmup_iters = 20
eval_interval = 200
patience_mem = 40
patience_comp = 40
