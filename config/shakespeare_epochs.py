# Shakespeare read for many epochs, to reach memorization: the model of config/shakespeare.py on
# the first 50k training tokens of Tiny Shakespeare, 800 steps of 2,048 tokens (about 33 epochs).
# Measured (experiments/README.md): the baseline's validation CE is lowest near step 200 and rises
# after it, while the training CE keeps falling. The whole text for 1500 steps (10 epochs) did not
# get there. Use it after config/shakespeare.py, which it amends:
#   python prepare_data.py text --files=input.txt --dataset=shakespeare_50k --max_tokens=70000 --val_tokens=20000 --val_every=3
#   python gapt.py config/shakespeare.py config/shakespeare_epochs.py --mode=baseline --out_dir=out-shakespeare-epochs-baseline-1
dataset = "shakespeare_50k"  # 49,989 train tokens; val: 20,011 tokens of the same plays (every third paragraph)
max_iters = 800
lr_decay_iters = 800
eval_interval = 50  # 16 evaluations: the minimum of the validation CE is located to 50 steps
align_interval = 20  # 40 measurements of the cycle per run
# the gate's patience: 7% of the run, as the paper's 125 of 1750 steps
patience_mem = 56
patience_comp = 56
