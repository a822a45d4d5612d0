# The benchmark on a laptop CPU: a small GPT (6 x 256, block 256) on random tokens of a small
# vocabulary, so the transformer blocks, where MBE lives, dominate the step as in GPT-2 124M.
#   python -m experiments.bench config/bench_cpu.py                  # eager
#   python -m experiments.bench config/bench_cpu.py --compile=True   # compiled
#   OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m experiments.bench config/bench_cpu.py --gradient_accumulation_steps=2
out_dir = "out-bench-cpu"
device = "cpu"
compile = False
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1
vocab_size = 512
align_interval = 50  # the default
steps = 10
rounds = 6
