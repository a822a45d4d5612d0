"""
The GPU launch path, exercised on a CPU as far as a CPU can: gapt.py's default model (GPT-2 124M,
block 1024) with bf16 autocast and torch.compile, on a small GPT-2-BPE corpus this check writes from
the repository's own text, for a few steps, then resumed for a few more.

    python -m experiments.launch_check              # about 10 minutes on 2 CPU cores (see experiments/README.md)

What a GPU adds (CUDA kernels, NCCL, fused AdamW, TF32) cannot run here: `python -m experiments.gpu_check`
is the check for whoever has a GPU. This one fails in one line if the loss does not fall, or if the
resumed run does not continue where the first one stopped.
"""

import glob
import json
import math
import os
import shutil
import sys
import time

import gapt
import prepare_data
from prepare_data import stop

DEFAULTS = dict(
    out_dir="out-launch-check",  # the corpus (data/) and the run (run/) go here; replaced on every check
    steps=6,  # optimizer steps of the first run
    resume_steps=3,  # further steps after resuming from its checkpoint
    batch_size=1,  # sequences of 1024 tokens per micro-batch (the default 16 would take hours on a CPU)
    gradient_accumulation_steps=2,  # micro-batches per step (the default 64 likewise)
    learning_rate=3e-4,  # low enough that a 124M model on 2k-token steps does not diverge
    dtype="bfloat16",  # the GPU's default precision, here on the CPU
    compile=True,  # the GPU's default
)
RULES = {**gapt.rule(lambda v: v > 0, "positive", ("steps", "resume_steps", "batch_size",
                                                    "gradient_accumulation_steps", "learning_rate")),
         **gapt.rule(lambda v: v != "", "a non-empty path", ("out_dir",)),
         **gapt.rule(lambda v: v in ("bfloat16", "float32"), "one of bfloat16, float32", ("dtype",))}


def write_corpus(folder):
    """The repository's own Markdown and Python files, one document each (a .jsonl line): real English
    and code, about 150k GPT-2 tokens, on every machine that has the repository."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(here, "*.md")) + glob.glob(os.path.join(here, "*.py"))
                   + glob.glob(os.path.join(here, "experiments", "*.*")))
    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "repo.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for path in files:
            with open(path, encoding="utf-8") as source:
                f.write(json.dumps(dict(text=source.read())) + "\n")
    prepare_data.main(["text", f"--files={corpus}", "--val_tokens=4096", f"--data_dir={os.path.join(folder, 'data')}",
                       "--dataset=repo"])


def run_launch_check(cfg):
    t0 = time.time()
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    write_corpus(cfg.out_dir)
    total = cfg.steps + cfg.resume_steps
    run = ["--device=cpu", f"--dtype={cfg.dtype}", f"--compile={cfg.compile}", f"--batch_size={cfg.batch_size}",
           f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps}", f"--learning_rate={cfg.learning_rate}",
           f"--min_lr={cfg.learning_rate / 10}", "--warmup_iters=1", f"--lr_decay_iters={total}",
           f"--max_iters={total}", "--log_interval=1", f"--eval_interval={cfg.steps}", "--eval_iters=2",
           "--patience_mem=2", "--patience_comp=2", "--align_interval=2",  # the gate and the probe both run
           f"--data_dir={os.path.join(cfg.out_dir, 'data')}", "--dataset=repo",
           f"--out_dir={os.path.join(cfg.out_dir, 'run')}"]
    first = gapt.train(gapt.load_config(run + [f"--max_iters={cfg.steps}"]))
    resumed = gapt.train(gapt.load_config(run + ["--init_from=resume"]))
    rows = gapt.read_log(os.path.join(cfg.out_dir, "run", "log.jsonl"))
    steps = [r["iter"] for r in rows if "ce" in r]
    val_ce = {r["iter"]: r["val_ce"] for r in rows if r.get("event") == "eval"}  # the same windows every time
    if steps != list(range(1, total + 1)):
        stop(f"the log has steps {steps}, not 1..{total}: the resumed run did not continue the first one")
    start_ce = math.log(first["model"].config.vocab_size)  # a model that knows nothing
    if not start_ce > val_ce[cfg.steps] > val_ce[total]:
        stop(f"the validation CE did not fall from {start_ce:.2f} (guessing) to {val_ce[cfg.steps]:.3f} "
             f"(step {cfg.steps}) to {val_ce[total]:.3f} (step {total}, resumed); try another --learning_rate")
    print(f"launch check passed in {time.time() - t0:.0f} s: GPT-2 {first['model'].num_params() / 1e6:.0f}M, "
          f"{cfg.dtype}, compile={cfg.compile}; validation CE {start_ce:.2f} (guessing) -> {val_ce[cfg.steps]:.3f} "
          f"(step {cfg.steps}) -> {val_ce[total]:.3f} (step {total}, resumed); phases {first['phases'] + resumed['phases']}")


if __name__ == "__main__":
    run_launch_check(gapt.parse_config(sys.argv[1:], DEFAULTS, RULES))
