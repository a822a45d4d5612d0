# The paper's text regime at laptop scale: about 2.3 passes over a real corpus, where a model sees its
# data twice and starts to memorize (the paper: 1750 steps over 0.8B FineWeb tokens, GPT-2 124M).
# The model is config/shakespeare.py's, which this file amends (put it after that one). The corpus is
# the Python 3.11 library reference from Debian's python3.11-doc package: 317 documents, 1.80M train +
# 0.28M val GPT-2 tokens, one document per file; with internet, the same amount of FineWeb is the
# equivalent (experiments/README.md, "The paper's text regime"). 2000 steps of 16 x 128 = 2,048 tokens
# read 4.1M: 2.28 passes over train.
#   sudo apt-get install python3.11-doc
#   python prepare_data.py text --files='/usr/share/doc/python3.11/html/_sources/library/*.rst.txt' --dataset=pydocs --sample_by=document
#   python gapt.py config/shakespeare.py config/pydocs.py --mode=baseline --seed=1 --out_dir=out-pydocs-baseline-1
# A run takes 55-56 min with one thread beside a second run (2-core AMD EPYC VM, 2026-12-07).
dataset = "pydocs"
out_dir = "out-pydocs"
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100  # 5% of the run, the default config's share (100 of 1750)
eval_interval = 100
align_interval = 20
# the gate's patience at 7% of the run, as the paper's 125 of 1750 steps
patience_mem = 140
patience_comp = 140
