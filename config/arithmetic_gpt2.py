# Arithmetic at the paper's scale (GPT-2 width and depth) for a GPU:
#   python prepare_data.py arithmetic
#   python gapt.py config/arithmetic_gpt2.py --mode=baseline --out_dir=out-arith-gpt2-baseline
#   python gapt.py config/arithmetic_gpt2.py --mode=gapt --out_dir=out-arith-gpt2-gapt
dataset = "arithmetic"
n_layer = 12  # MBE_reg: blocks 2..9
n_head = 12
n_embd = 768
block_size = 64  # the longest val_ood example has 27 characters
batch_size = 256
gradient_accumulation_steps = 1
dropout = 0.0
learning_rate = 6e-4
warmup_iters = 200
max_iters = 5000
lr_decay_iters = 5000
min_lr = 6e-5
eval_interval = 500
eval_iters = 20
log_interval = 50
align_interval = 100
answer_eval_examples = 2000
patience_mem = 350  # 7% of the run, as the paper's 125 of 1750
patience_comp = 350
