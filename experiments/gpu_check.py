"""
The GPU check: one command, under 10 minutes on one GPU, whose output fills the GPU table of
experiments/README.md.

    python prepare_data.py arithmetic
    python -m experiments.gpu_check                  # one CUDA GPU; writes out-gpu-check/

1. The benchmark on GPT-2 124M, compiled, bf16: tokens/s and MFU of a baseline step, the
   compression step against it, the cost of one alignment measurement, peak memory.
2. A short run of config/arithmetic_gpt2.py (GPT-2 width and depth) in each mode, with the
   gate's patience scaled to the run's length as in the full config (7% of the steps).

--smoke=True runs the same program with a tiny model and a few steps, on any device: the tests
use it on a CPU. It checks the program, not the numbers.
"""

import json
import os
import sys

import gapt
from experiments import bench
from experiments.report import final_metrics
from prepare_data import stop

DEFAULTS = dict(
    out_dir="out-gpu-check",  # bench/, one folder per arithmetic run, and gpu_check.json go here
    data_dir="data",  # where prepare_data.py wrote arithmetic/
    device="cuda",  # the check is meant for one GPU; other devices only run the program
    bench_steps=10,  # timed optimizer steps per variant per round of the benchmark
    bench_rounds=3,  # benchmark rounds (the median round is reported)
    arith_iters=300,  # optimizer steps of each arithmetic run
    smoke=False,  # a tiny model and a few steps: checks the program anywhere (the tests)
)
RULES = {**gapt.rule(lambda v: v > 0, "positive", ("bench_steps", "bench_rounds", "arith_iters")),
         **gapt.rule(lambda v: v != "", "a non-empty path", ("out_dir", "data_dir"))}
MODES = ("baseline", "iblm", "gapt")
SMOKE_MODEL = ["--n_layer=3", "--n_head=2", "--n_embd=16", "--mbe_skip_first=1", "--mbe_skip_last=1",
               "--patch_size=8", "--compile=False"]


def bench_config(cfg):
    """GPT-2 124M (gapt.py's defaults) at 16 x 1024 tokens per micro-batch, 4 micro-batches a step."""
    args = [f"--device={cfg.device}", f"--out_dir={os.path.join(cfg.out_dir, 'bench')}", "--batch_size=16",
            "--gradient_accumulation_steps=4", f"--steps={cfg.bench_steps}", f"--rounds={cfg.bench_rounds}"]
    if cfg.smoke:
        args += SMOKE_MODEL + ["--block_size=64", "--batch_size=2", "--vocab_size=64"]
    return bench.load_config(args)


def arithmetic_config(cfg, mode):
    """config/arithmetic_gpt2.py, shortened."""
    out_dir = os.path.join(cfg.out_dir, f"arith-{mode}")
    n = cfg.arith_iters
    patience = max(1, round(0.07 * n))
    args = [os.path.join(os.path.dirname(gapt.__file__), "config", "arithmetic_gpt2.py"), f"--mode={mode}",
            f"--out_dir={out_dir}", f"--data_dir={cfg.data_dir}", f"--device={cfg.device}", f"--max_iters={n}",
            f"--lr_decay_iters={n}", f"--warmup_iters={max(1, n // 10)}", f"--eval_interval={n}",
            f"--patience_mem={patience}", f"--patience_comp={patience}", f"--align_interval={max(1, n // 10)}"]
    if cfg.smoke:
        args += SMOKE_MODEL + ["--batch_size=4", "--eval_iters=1", "--answer_eval_examples=20", "--log_interval=1"]
    return gapt.load_config(args)


def run_arithmetic(arith_cfg):
    """One arithmetic run; returns its final evaluation (experiments.report's metrics)."""
    gapt.train(arith_cfg)
    return final_metrics(arith_cfg.out_dir, gapt.read_log(os.path.join(arith_cfg.out_dir, "log.jsonl")))


def print_tables(summary, runs):
    rows = {row["variant"]: row for row in summary["rows"]}
    base = rows["baseline (CE only)"]
    print(f"\n{summary['device']}, {summary['params'] / 1e6:.1f}M parameters, compile={summary['compile']}, "
          f"{summary['tokens_per_step']:,} tokens per step, peak memory {summary['peak_memory_gb']} GB\n")
    print("| baseline tok/s | baseline MFU | compression step / baseline | one alignment / baseline step |")
    print("|---:|---:|---:|---:|")
    mfu = f"{base['mfu']:.1%}" if "mfu" in base else "-"  # MFU needs the GPU's peak FLOP/s (gapt.PEAK_FLOPS)
    print(f"| {base['tok_per_s']:,} | {mfu} "
          f"| {rows['gapt, compression phase']['ratio_to_baseline']:.3f} "
          f"| {rows['alignment measurement (one)']['ratio_to_baseline']:.3f} |\n")
    keys = ("val_ce", "val_mbe", "val_answer_ce", "val_ood_answer_ce", "compressing")
    print("| mode | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for mode, metrics in runs.items():
        print(f"| {mode} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |")


def load_config(argv):
    return gapt.parse_config(argv, DEFAULTS, RULES)


def run_gpu_check(cfg):
    # everything is checked before the benchmark writes its first file: out_dir, the configs derived
    # from ours (the device among them) and the data; gapt.train's own checks come after the benchmark
    gapt.check_writable(cfg.out_dir)
    arith_cfgs = {mode: arithmetic_config(cfg, mode) for mode in MODES}
    for arith_cfg in arith_cfgs.values():
        if os.path.exists(os.path.join(arith_cfg.out_dir, "ckpt.pt")):
            stop(f"out_dir {cfg.out_dir!r} holds an earlier check ({arith_cfg.out_dir}/ckpt.pt): "
                 f"choose another --out_dir, or delete {cfg.out_dir!r} to check again")
    bench_cfg = bench_config(cfg)
    gapt.check_data(arith_cfgs["baseline"])  # every mode reads the same data
    summary = bench.run_bench(bench_cfg)
    runs = {mode: run_arithmetic(arith_cfg) for mode, arith_cfg in arith_cfgs.items()}
    print_tables(summary, runs)
    path = os.path.join(cfg.out_dir, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(dict(config=cfg, bench=summary, arithmetic=runs), f, indent=1)
    print(f"\nevery number in {path}")
    return dict(bench=summary, arithmetic=runs)


if __name__ == "__main__":
    run_gpu_check(load_config(sys.argv[1:]))
