"""
How many CPU threads a run should use: each CPU workload with one thread and with two, on a quiet
machine and with a busy loop on another core (as on a laptop where other work runs).

    python prepare_data.py arithmetic
    python prepare_data.py text --files=input.txt --dataset=shakespeare
    python -m experiments.threads          # about 10 minutes on a 2-core CPU; prints a Markdown table

The training runs report milliseconds per step from their log (startup and evaluation left out);
the toy, the whole run's wall time.
"""

import os
import subprocess
import sys
import tempfile
import time

import gapt
from prepare_data import stop

DEFAULTS = dict(
    steps=20,  # optimizer steps of each training run measured
    toy_steps=150,  # steps per task of the toy (experiments.forgetting, one seed)
    thread_counts="1,2",  # the thread counts compared, comma-separated
)
RULES = {**gapt.rule(lambda v: v > 0, "positive", ("steps", "toy_steps")),
         **gapt.rule(lambda v: all(c.isdigit() and int(c) > 0 for c in v.split(",")),
                     "positive counts, comma-separated", ("thread_counts",))}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(cfg, out):
    """Each workload's command, writing into out."""
    train = lambda config: [sys.executable, "gapt.py", config, f"--max_iters={cfg.steps}", "--log_interval=1",
                            f"--eval_interval={cfg.steps}", f"--out_dir={out}"]
    return {"config/shakespeare.py": train("config/shakespeare.py"), "config/arithmetic.py": train("config/arithmetic.py"),
            "experiments.forgetting": [sys.executable, "-m", "experiments.forgetting", "--seeds=1",
                                       f"--steps={cfg.toy_steps}", f"--out_dir={out}"]}


def seconds(command, threads, out):
    """Seconds per step from a training run's log (the first step, a warm-up, left out), or the toy's
    wall time; the program's own --threads, not OMP_NUM_THREADS, sets the count."""
    start = time.time()
    done = subprocess.run(command + [f"--threads={threads}"], cwd=HERE, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    if done.returncode:
        stop(f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = [r for r in gapt.read_log(os.path.join(out, "log.jsonl")) if "ms_per_step" in r]
    return sum(r["ms_per_step"] for r in rows[1:]) / 1000 / len(rows[1:]) if rows else time.time() - start


def main(cfg):
    counts = [int(c) for c in cfg.thread_counts.split(",")]
    print(f"{os.cpu_count()} cores; seconds per step (training) or per run (the toy)\n")
    print("| workload | " + " | ".join(f"{n} thread{'s' * (n > 1)}, {load}" for load in ("quiet", "one core busy")
                                       for n in counts) + " |")
    print("|---|" + "---:|" * 2 * len(counts))
    for name in commands(cfg, ""):
        cells = []
        for busy in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for n in counts:
                    with tempfile.TemporaryDirectory() as out:
                        cells.append(f"{seconds(commands(cfg, out)[name], n, out):.3f}")
            finally:
                if hog:
                    hog.kill()
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(gapt.parse_config(sys.argv[1:], DEFAULTS, RULES))
