# A laptop-sized GPT on Tiny Shakespeare with GPT-2 BPE (a CPU stand-in for the FineWeb run).
#   curl -O https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
#   python prepare_data.py text --files=input.txt --dataset=shakespeare
#   python gapt.py config/shakespeare.py --mode=gapt --out_dir=out-shakespeare-gapt
dataset = "shakespeare"
out_dir = "out-shakespeare"
device = "cpu"
compile = False  # compiling a small model on a laptop costs more than it saves on a short run
n_layer = 6  # blocks 2 and 3 are regularized (mbe_skip_first = mbe_skip_last = 2)
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
dropout = 0.0
learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 10
align_interval = 10
# the gate's patience scaled from the paper's 125 of 1750 steps (7%) to this run's length
patience_mem = 40
patience_comp = 40
