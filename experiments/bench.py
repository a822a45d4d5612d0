"""
The benchmark: what MBE, the GAPT gate and the alignment probe cost, per training step.
Variants take turns in rounds inside one process, so machine noise hits them alike, and each is
reported as a ratio to the baseline step. Random tokens: no dataset needed. It takes every gapt.py
key (the model, batch, device, dtype, compile, DDP under torchrun) plus its own two:

    python -m experiments.bench config/bench_cpu.py                    # a small GPT on a laptop CPU
    python -m experiments.bench config/bench_cpu.py --compile=True
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m experiments.bench config/bench_cpu.py \\
        --gradient_accumulation_steps=2
    python -m experiments.bench --device=cuda --batch_size=16 --gradient_accumulation_steps=4   # GPT-2 124M, 1 GPU
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gapt
from gapt import GAPT, draw_step_windows, measure_alignment, phase_and_weight, train_step
from prepare_data import stop

DEFAULTS = dict(gapt.DEFAULTS,
                steps=20,  # timed optimizer steps per variant per round
                rounds=5)  # rounds; variants take turns within a round and the median round is reported
RULES = {**gapt.RULES,
         **gapt.rule(lambda v: v > 0, "positive", ("steps", "rounds")),
         **gapt.rule(lambda v: 0 < v <= 2 ** 16, "in 1..65536 (the random tokens are uint16)", ("vocab_size",))}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_variants(cfg, model, train_model, optimizer, token_path, autocast_ctx, dist_info, micro_steps, n_tokens):
    """name -> function running one optimizer step of that variant (or one alignment measurement)."""
    data_gen = torch.Generator().manual_seed(cfg.seed)
    # a gate held in compression: it still runs its update every step, as in a real GAPT run
    gate = GAPT(patience_comp=2 ** 62, tau=math.inf, device=dist_info.device)
    gate.load_state_dict(dict(gate.state_dict(), phase=2))

    def draw():
        return draw_step_windows(data_gen, n_tokens, micro_steps, cfg.batch_size, cfg.block_size,
                                 dist_info.rank, dist_info.world_size)

    def baseline_step():
        train_step(train_model, optimizer, draw(), 0.0, cfg, token_path, autocast_ctx, dist_info)

    def compression_step():
        _, weight = phase_and_weight("gapt", cfg.mbe_weight, gate)
        ce, mbe_reg = train_step(train_model, optimizer, draw(), weight, cfg, token_path, autocast_ctx, dist_info)
        gate.step(ce, mbe_reg)

    def alignment():
        measure_alignment(model, draw()[0], cfg, token_path, autocast_ctx, dist_info)

    return {"baseline (CE only)": baseline_step, "gapt, compression phase": compression_step,
            "alignment measurement (one)": alignment}


def run_bench(cfg):
    gapt.set_threads(cfg.threads)
    dist_info = gapt.setup_distributed(cfg)
    device = dist_info.device
    micro_steps = gapt.micro_steps_per_process(cfg, dist_info)
    torch.manual_seed(cfg.seed)
    model = gapt.make_model(cfg).to(device)
    optimizer = gapt.make_optimizer(model, cfg, device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    token_path = os.path.join(cfg.out_dir, f"bench_tokens_rank{dist_info.rank}.bin")
    n_tokens = 64 * cfg.block_size
    np.random.default_rng(cfg.seed).integers(cfg.vocab_size, size=n_tokens, dtype=np.uint16).tofile(token_path)
    train_model = torch.compile(model) if cfg.compile else model  # as train() builds it
    if dist_info.ddp:
        train_model = DDP(train_model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    autocast_ctx = gapt.autocast_context(cfg, device)
    variants = bench_variants(cfg, model, train_model, optimizer, token_path, autocast_ctx, dist_info, micro_steps, n_tokens)
    for run_step in variants.values():  # warm-up: compilation and allocator caches
        for _ in range(3):
            run_step()
    timings = {name: [] for name in variants}
    for round_num in range(cfg.rounds):
        order = list(variants.items())
        for name, run_step in order if round_num % 2 == 0 else order[::-1]:  # no variant always goes first
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                run_step()
            synchronize(device)
            timings[name].append((time.perf_counter() - t0) / cfg.steps)
    del variants, train_model  # they hold the DDP wrapper, which holds the process group
    gapt.shutdown_distributed(dist_info)
    return report_bench(cfg, model, timings, dist_info)


def report_bench(cfg, model, timings, dist_info):
    device = dist_info.device
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    peak = gapt.peak_flops(device)
    medians = {name: float(np.median(times)) for name, times in timings.items()}
    base = medians["baseline (CE only)"]
    if cfg.align_interval:  # one measurement every align_interval steps of a baseline run, spread over them
        medians[f"baseline + alignment every {cfg.align_interval}"] = (
            base + medians["alignment measurement (one)"] / cfg.align_interval)
    rows = []
    for name, dt in medians.items():
        times = timings.get(name, [dt])
        row = dict(variant=name, ms_per_step=round(1000 * dt, 2))
        if name != "alignment measurement (one)":  # not a training step: no throughput
            row["tok_per_s"] = round(tokens_per_step / dt)
        row.update(ratio_to_baseline=round(dt / base, 4), spread_ms=round(1000 * (max(times) - min(times)), 2))
        if peak and "tok_per_s" in row:
            row["mfu"] = round(gapt.flops_per_token(model) * tokens_per_step / dt / (peak * dist_info.world_size), 4)
        rows.append(row)
    summary = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
                   world_size=dist_info.world_size, compile=cfg.compile, params=model.num_params(),
                   tokens_per_step=tokens_per_step, rows=rows)
    if device.type == "cuda":
        summary["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    else:  # the whole process's peak resident memory (Linux reports kilobytes)
        import resource
        summary["peak_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    if dist_info.master:
        print(f"{summary['device']}, {dist_info.world_size} process(es), compile={cfg.compile}, "
              f"{model.num_params() / 1e6:.2f}M parameters, {tokens_per_step:,} tokens per step, "
              f"peak memory {summary['peak_memory_gb']} GB")
        for row in rows:
            print(gapt.format_row(row))
        with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def load_config(argv):
    cfg = gapt.parse_config(argv, DEFAULTS, RULES)
    gapt.validate_config(cfg)
    gapt.check_writable(cfg.out_dir)
    return cfg


if __name__ == "__main__":
    run_bench(load_config(sys.argv[1:]))
