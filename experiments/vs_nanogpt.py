"""
Speed against nanoGPT: nanoGPT's train.py and gapt.py's baseline on the same data and model, and gapt's
baseline with no MBE computed at all, each run as a subprocess in turns (A B C, then C B A, ...) so that
machine noise hits them alike. Both programs use the same threads, float32 on the CPU, no compile, no
evaluation between the timed steps and the vocabulary of 50304 (GPT-2's, padded). Needs a nanoGPT checkout
(git clone https://github.com/karpathy/nanoGPT) and a GPT-2 BPE dataset made by prepare_data.py:

    python -m experiments.vs_nanogpt --nanogpt_dir=../nanoGPT                       # Tiny Shakespeare, 4 x 128
    python -m experiments.vs_nanogpt --nanogpt_dir=../nanoGPT --rounds=6 --steps=15 --threads=2
    python -m experiments.vs_nanogpt --nanogpt_dir=../nanoGPT --same_allocator=True  # what the allocator gives

Per step it reads each program's own step time (nanoGPT's "time ... ms", gapt's ms_per_step; the first
`warmup` steps of a run are left out) and, on Linux, the CPU time the process used between two step lines,
which the machine's load hardly moves. It prints, per round and overall, the median ms per step, gapt's
speed as a multiple of nanoGPT's, and the MBE overhead (gapt's step over the same step without MBE), and
writes out_dir/vs_nanogpt.json. The no-MBE variant is gapt.py with patch_mbe replaced by a zero.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np

import gapt
from prepare_data import read_meta, stop

DEFAULTS = dict(
    nanogpt_dir="",  # a nanoGPT checkout: the folder with its train.py, model.py and configurator.py
    data_dir="data",  # our data: data_dir/<dataset>/{train,val}.bin, as nanoGPT reads them
    dataset="shakespeare",  # a GPT-2 BPE dataset (nanoGPT without meta.pkl uses GPT-2's vocabulary)
    n_layer=4,  # the model, the same in both programs
    n_head=4,
    n_embd=128,
    block_size=128,
    batch_size=16,  # one micro-batch of batch_size x block_size tokens per step
    bias=False,
    threads=1,  # torch threads in every program (OMP_NUM_THREADS and gapt's --threads)
    steps=12,  # optimizer steps per run
    warmup=2,  # first steps of each run left out of the timings
    rounds=3,  # rounds; in each, every variant runs once
    same_allocator=False,  # True: nanoGPT runs with gapt.py's glibc setting too (keep_freed_memory), through its env vars
    out_dir="out-vs-nanogpt",  # the runs' outputs and vs_nanogpt.json
)
RULES = {**gapt.rule(lambda v: v > 0, "positive", ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                    "threads", "steps", "rounds")),
         **gapt.rule(lambda v: v >= 0, ">= 0", ("warmup",)),
         **gapt.rule(lambda v: v != "", "a non-empty path or name", ("data_dir", "dataset", "out_dir"))}
VARIANTS = ("nanogpt", "gapt", "gapt_no_mbe")
STEP_LINES = {  # a step's line in each program's output -> (iteration, ms)
    "nanogpt": re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms"),
    "gapt": re.compile(r"^iter (\d+) \|.*\| ms_per_step ([\d.]+)"),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MBE = ("import sys, gapt; gapt.patch_mbe = lambda h, patch_size: h.new_zeros(()); "
          "gapt.train(gapt.load_config(sys.argv[1:]))")


def commands(cfg, name, run_dir):
    """(argv, cwd) of one run. nanoGPT reads data/<dataset> and configurator.py from its working folder:
    run_dir, with links to ours and to its own."""
    model = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                 batch_size=cfg.batch_size, bias=cfg.bias, dropout=0.0, gradient_accumulation_steps=1,
                 device="cpu", compile=False, dtype="float32", log_interval=1, eval_iters=1, eval_interval=10 ** 9)
    if name == "nanogpt":
        os.makedirs(os.path.join(run_dir, "data"))  # nanoGPT's out_dir goes in it too
        os.symlink(os.path.abspath(os.path.join(cfg.data_dir, cfg.dataset)), os.path.join(run_dir, "data", cfg.dataset))
        os.symlink(os.path.join(cfg.nanogpt_dir, "configurator.py"), os.path.join(run_dir, "configurator.py"))
        # nanoGPT runs iterations 0..max_iters and evaluates once, before iteration 0 (a warm-up step)
        args = dict(model, dataset=cfg.dataset, out_dir=os.path.join(run_dir, "out"), max_iters=cfg.steps - 1)
        argv = [sys.executable, os.path.join(cfg.nanogpt_dir, "train.py")] + [f"--{k}={v}" for k, v in args.items()]
        return argv, run_dir
    # gapt evaluates once, after its last step: outside the timings
    args = dict(model, mode="baseline", data_dir=os.path.abspath(cfg.data_dir), dataset=cfg.dataset, out_dir=run_dir,
                max_iters=cfg.steps, align_interval=0, threads=cfg.threads, mbe_skip_first=0, mbe_skip_last=0)
    script = ["-c", NO_MBE] if name == "gapt_no_mbe" else [os.path.join(REPO, "gapt.py")]
    return [sys.executable] + script + [f"--{k}={v}" for k, v in args.items()], REPO



def cpu_seconds(pid):
    """User + system CPU time of a running process (Linux); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_once(cfg, name, run_dir):
    """One run: its steps' (ms, cpu_ms or None), warm-up steps left out. The process and anything it starts
    form a session of their own, killed whatever happens here (Ctrl-C included)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # left by a measurement that was killed
    argv, cwd = commands(cfg, name, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), PYTHONUNBUFFERED="1")
    if name == "nanogpt" and cfg.same_allocator:  # glibc reads them at start: what gapt.py sets with mallopt
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2 ** 31 - 1))
    pattern = STEP_LINES["nanogpt" if name == "nanogpt" else "gapt"]
    steps, output = [], []
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        last_cpu = cpu_seconds(proc.pid)
        for line in proc.stdout:
            output.append(line)
            match = pattern.match(line)
            if match:
                cpu = cpu_seconds(proc.pid)
                steps.append((float(match[2]), None if cpu is None or last_cpu is None else 1000 * (cpu - last_cpu)))
                last_cpu = cpu
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log = run_dir + ".txt"
        with open(log, "w") as f:
            f.writelines(output)
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: the output is what is kept
    if proc.returncode != 0 or len(steps) != cfg.steps:
        stop(f"{name} exited with {proc.returncode} after {len(steps)} of {cfg.steps} steps; its output is in {log}, "
             f"last line: {output[-1].strip() if output else ''!r}")
    return steps[cfg.warmup:]


def median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def ratios(ms):
    """gapt's speed as a multiple of nanoGPT's, and the MBE overhead, from medians per variant."""
    if None in ms.values():
        return dict(speed_vs_nanogpt=None, mbe_overhead=None)
    return dict(speed_vs_nanogpt=round(ms["nanogpt"] / ms["gapt"], 4),
                mbe_overhead=round(ms["gapt"] / ms["gapt_no_mbe"], 4))


def summarize(steps_by_round):
    """steps_by_round: [{variant: [(ms, cpu_ms), ...]}] -> per-round and overall medians and ratios."""
    rows = []
    for i, steps in enumerate(steps_by_round + [{v: sum((r[v] for r in steps_by_round), []) for v in VARIANTS}]):
        row = dict(round=i + 1 if i < len(steps_by_round) else "all")
        for column, index in (("ms", 0), ("cpu_ms", 1)):
            medians = {v: median([s[index] for s in steps[v]]) for v in VARIANTS}
            row.update({f"{v}_{column}": None if m is None else round(m, 1) for v, m in medians.items()})
            row.update({f"{k}_{column}": r for k, r in ratios(medians).items()})
        rows.append(row)
    return rows


HEAD = f"{'gapt':>7} {'no MBE':>7} | {'gapt speed':>10} {'MBE cost':>8}"


def table_cells(row, column, width):
    cells = [row[f"{key}_{column}"] or 0 for key in VARIANTS + ("speed_vs_nanogpt", "mbe_overhead")]
    return "{:{}.1f} {:7.1f} {:7.1f} | {:10.3f} {:8.3f}".format(cells[0], width, *cells[1:])


def check(cfg):
    files = [os.path.join(cfg.nanogpt_dir, name) for name in ("train.py", "configurator.py")]
    if not (cfg.nanogpt_dir and all(map(os.path.isfile, files))):
        stop(f"nanogpt_dir {cfg.nanogpt_dir!r} holds no nanoGPT train.py and configurator.py; "
             f"git clone https://github.com/karpathy/nanoGPT and pass --nanogpt_dir=<that folder>")
    if cfg.warmup >= cfg.steps:
        stop(f"warmup ({cfg.warmup}) must be less than steps ({cfg.steps}): no timed step would be left")
    gapt.validate_config(gapt.Config(gapt.DEFAULTS, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     block_size=cfg.block_size, device="cpu", mbe_skip_first=0, mbe_skip_last=0))
    meta = read_meta(cfg.data_dir, cfg.dataset)
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(cfg.data_dir, cfg.dataset, f"{split}.bin")):
            stop(f"{os.path.join(cfg.data_dir, cfg.dataset, split + '.bin')} not found; make the dataset with "
                 f"prepare_data.py (python prepare_data.py text --files=input.txt --dataset={cfg.dataset})")
    vocab = gapt.model_vocab_size(gapt.Config(vocab_size=gapt.DEFAULTS["vocab_size"]), meta)
    if vocab != 50304 or os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "meta.pkl")):
        stop(f"dataset '{cfg.dataset}' gives gapt a vocabulary of {vocab}, and nanoGPT reads its own meta.pkl or else "
             f"uses 50304: the models would differ. Use a GPT-2 BPE dataset without meta.pkl (prepare_data.py text)")
    gapt.check_writable(cfg.out_dir)


def main(cfg):
    check(cfg)
    cfg.nanogpt_dir = os.path.abspath(cfg.nanogpt_dir)
    os.makedirs(cfg.out_dir, exist_ok=True)
    steps_by_round = []
    for round_num in range(cfg.rounds):
        steps = {}
        for name in VARIANTS if round_num % 2 == 0 else VARIANTS[::-1]:  # no variant always goes first
            run_dir = os.path.abspath(os.path.join(cfg.out_dir, f"{name}-round{round_num + 1}"))
            steps[name] = run_once(cfg, name, run_dir)
            print(f"round {round_num + 1}, {name}: {median([s[0] for s in steps[name]]):.1f} ms per step", flush=True)
        steps_by_round.append(steps)
    rows = summarize(steps_by_round)
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, {cfg.batch_size} x {cfg.block_size} tokens per step, float32, "
          f"{cfg.threads} thread(s), CPU; medians of {cfg.steps - cfg.warmup} steps per run and over all runs; "
          f"gapt speed = nanoGPT's ms / gapt's, MBE cost = gapt's ms / no MBE's")
    print(f"{'round':>5} | {'ms per step: nanoGPT':>20} {HEAD} | {'CPU ms per step: nanoGPT':>24} {HEAD}")
    for row in rows:
        print(f"{row['round']:>5} | {table_cells(row, 'ms', 20)} | {table_cells(row, 'cpu_ms', 24)}")
    with open(os.path.join(cfg.out_dir, "vs_nanogpt.json"), "w") as f:
        json.dump(dict(config=cfg, cpu_count=os.cpu_count(), rows=rows, steps=steps_by_round), f, indent=1)
    return rows


def load_config(argv):
    return gapt.parse_config(argv, DEFAULTS, RULES)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill runs the finally that kills the run's session
    main(load_config(sys.argv[1:]))
