# The paper's FineWeb run: GPT-2 124M, about 1M tokens per step, 1750 steps (1.8B tokens).
# These are gapt.py's defaults, written out so the experiment is explicit:
#   python prepare_data.py fineweb --max_tokens=2000000000
#   torchrun --standalone --nproc_per_node=8 gapt.py config/fineweb_gpt2.py --mode=baseline --out_dir=out-fineweb-baseline
#   torchrun --standalone --nproc_per_node=8 gapt.py config/fineweb_gpt2.py --mode=gapt --out_dir=out-fineweb-gapt
dataset = "fineweb"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 16  # per GPU; 16 x 1024 x 64 = 1,048,576 tokens per optimizer step
gradient_accumulation_steps = 64  # over all GPUs: 8 micro-steps each on 8 GPUs
max_iters = 1750
lr_decay_iters = 1750
warmup_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
patience_mem = 125
patience_comp = 125
align_interval = 50
eval_interval = 250
