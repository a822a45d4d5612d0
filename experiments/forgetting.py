"""
The conflicting-memories toy: the paper's claim that compression protects against catastrophic
forgetting. Compression phases (loss + lambda * MBE) squeeze each task's representation into a
compact cluster, so two conflicting tasks should end up with well separated representations
(paper: +97% separation for GAPT over plain training).

A student MLP learns two regression tasks whose teachers pull the weights in opposite directions
(theta0 + dtheta on inputs p1, theta0 - dtheta on inputs p2), either one after the other
(sequential) or interleaved (mixed), with L1 loss alone (baseline), L1 + lambda * MBE always
(iblm), or gapt.py's GAPT gate switching MBE on and off.

    python -m experiments.forgetting                 # 5 seeds x 2 schedules x 3 modes, about 35 s on a CPU
    python -m experiments.forgetting --seeds=1 --steps=200
    python -m experiments.report --runs=out-forgetting --file=assets/forgetting.png
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gapt import GAPT, ConfigError, iblm_loss, mbe_weight_for, parse_config, patch_mbe

DEFAULTS = dict(
    out_dir="out-forgetting",  # forgetting.json (every number and curve) goes here
    seeds=5,  # seeds 0..n-1; a seed fixes teacher, shift, data and batches for every mode
    steps=1000,  # optimizer steps per task; both schedules run 2 * steps steps
    batch_size=32,  # samples per step; this batch is the "sequence" MBE is taken over (paper: 32)
    patch_size=8,  # MBE patch length inside the batch (paper: 8, max MBE = log 8)
    lr=1e-3,  # Adam learning rate, fixed (no schedule: the task switch is the only event)
    mbe_weight=1.0,  # lambda of L1 + lambda * MBE for iblm and for gapt's compression phase (paper: 1)
    n_eval=1000,  # held-out samples per distribution for separation, losses and MBE
    eval_interval=20,  # steps between points of the logged curves
    delta_ce=0.01,  # gate: an L1 drop smaller than this is no progress (paper's value)
    delta_mbe=0.002,  # gate: an MBE drop smaller than this is no progress (paper's value)
    # The paper waits 125 steps of a 1750-step run (~7%). One task here is 1000 steps, so the same
    # fraction of a task is 125 * 1000 / 1750 ~= 70 steps: room for several cycles per task.
    patience_mem=70,  # gate: steps without L1 progress before compressing
    patience_comp=70,  # gate: steps without MBE progress before memorizing again
    tau=0.1,  # gate: relative L1 rise that aborts compression (paper's value)
)
POSITIVE = ("seeds", "steps", "batch_size", "patch_size", "n_eval", "eval_interval")
FORGET_MODES = ("baseline", "iblm", "gapt")
FORGET_SCHEDULES = ("sequential", "mixed")
PAPER_SEPARATION_GAIN_PCT = 97.0  # the paper's headline for this toy, GAPT vs baseline


class ToyMLP(nn.Module):
    """Teacher and student: 10 -> 20 -> 10 with ReLU; the ReLU layer is the representation."""

    def __init__(self, n_in=10, n_hidden=20, n_out=10):
        super().__init__()
        self.fc = nn.Linear(n_in, n_hidden)
        self.proj = nn.Linear(n_hidden, n_out)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return self.proj(h), h


def sample_inputs(n, task, generator):
    """p1: dims 0-4 ~ N(1, 0.25^2), dims 5-9 ~ N(0, 0.25^2); p2 (task 2) is the mirror image."""
    x = 0.25 * torch.randn(n, 10, generator=generator)
    hot = slice(0, 5) if task == 1 else slice(5, 10)
    x[:, hot] += 1.0
    return x


def random_init(generator):
    """theta0 = nn.Linear's default init (U(+-1/sqrt(fan_in)) for weights and biases), drawn from
    our own generator so that a seed alone fixes it, without touching the global RNG."""
    theta = {}
    for name, n_out, n_in in (("fc", 20, 10), ("proj", 10, 20)):
        bound = 1 / math.sqrt(n_in)
        theta[f"{name}.weight"] = (2 * torch.rand(n_out, n_in, generator=generator) - 1) * bound
        theta[f"{name}.bias"] = (2 * torch.rand(n_out, generator=generator) - 1) * bound
    return theta


def random_shift(theta, generator, rank=3):
    """dtheta: a rank-<=3 direction per weight matrix, a Gaussian direction per bias, each rescaled to
    the norm of its own tensor times one factor U(0.5, 5) drawn per tensor, so the shift is large
    (up to 5x the weights) and differently large in each layer."""
    dtheta = {}
    for name, p in theta.items():
        if p.dim() == 2:
            n_out, n_in = p.shape
            direction = torch.randn(n_out, rank, generator=generator) @ torch.randn(rank, n_in, generator=generator)
        else:
            direction = torch.randn(p.shape, generator=generator)
        scale = p.norm() * (0.5 + 4.5 * torch.rand((), generator=generator))
        dtheta[name] = direction * (scale / direction.norm())
    return dtheta


@torch.no_grad()
def teacher_targets(theta, x):
    teacher = ToyMLP()
    teacher.load_state_dict(theta)
    return teacher(x)[0]


def make_forgetting_tasks(seed, n_train=32000, n_eval=1000):
    """Everything random about one seed: the student's start theta0, both tasks' training streams
    (n_train samples each, consumed in order, so every mode sees the same batches) and a held-out
    evaluation set per task, drawn from its own generator so it does not depend on n_train.
    Defaults match steps * batch_size and n_eval."""
    g = torch.Generator().manual_seed(seed)
    theta0 = random_init(g)
    dtheta = random_shift(theta0, g)
    teachers = {1: {k: theta0[k] + dtheta[k] for k in theta0},   # task 1 pulls one way ...
                2: {k: theta0[k] - dtheta[k] for k in theta0}}   # ... task 2 the opposite way
    g_eval = torch.Generator().manual_seed(1_000_000 + seed)
    tasks = {"theta0": theta0}
    for task in (1, 2):
        x_train = sample_inputs(n_train, task, g)
        x_eval = sample_inputs(n_eval, task, g_eval)
        tasks[f"x{task}_train"], tasks[f"y{task}_train"] = x_train, teacher_targets(teachers[task], x_train)
        tasks[f"x{task}_eval"], tasks[f"y{task}_eval"] = x_eval, teacher_targets(teachers[task], x_eval)
    return tasks


def separation(h1, h2):
    """between / sqrt(within) of two clouds of representations h1 (N1, D), h2 (N2, D):
    between = distance of the two means, within = mean of the two mean squared distances to the
    own mean. The 1e-12 only keeps a fully collapsed (all-zero) representation from giving 0/0."""
    mu1, mu2 = h1.mean(0), h2.mean(0)
    between = (mu1 - mu2).norm()
    within = 0.5 * (((h1 - mu1) ** 2).sum(1).mean() + ((h2 - mu2) ** 2).sum(1).mean())
    return (between / torch.sqrt(within + 1e-12)).item()


def training_batches(tasks, schedule, steps_per_task, batch_size):
    """Yields 2 * steps_per_task (x, y) batches. Sequential: task 1's stream, then task 2's.
    Mixed: every batch is half task 1, half task 2, in that order, so both schedules consume
    exactly the same samples. With batch_size/2 a multiple of the patch size, no MBE patch mixes
    the tasks: MBE measures within-task entropy in both schedules (a mixed patch would instead
    reward making the two tasks' representations parallel, i.e. less separated)."""
    half = batch_size // 2
    for step in range(2 * steps_per_task):
        if schedule == "sequential":
            task, i = (1, step) if step < steps_per_task else (2, step - steps_per_task)
            rows = slice(i * batch_size, (i + 1) * batch_size)
            yield tasks[f"x{task}_train"][rows], tasks[f"y{task}_train"][rows]
        else:
            rows = slice(step * half, (step + 1) * half)
            yield (torch.cat([tasks["x1_train"][rows], tasks["x2_train"][rows]]),
                   torch.cat([tasks["y1_train"][rows], tasks["y2_train"][rows]]))


@torch.no_grad()
def evaluate_forgetting(model, tasks, patch_size):
    """Held-out L1 per task, separation of the two tasks' hidden clouds, and their patch MBE."""
    y1, h1 = model(tasks["x1_eval"])
    y2, h2 = model(tasks["x2_eval"])
    return dict(
        loss1=F.l1_loss(y1, tasks["y1_eval"]).item(),
        loss2=F.l1_loss(y2, tasks["y2_eval"]).item(),
        separation=separation(h1, h2),
        # (N, 20) -> (1, N, 20): the eval set is one long "sequence", cut into patches as in training
        mbe=0.5 * (patch_mbe(h1.unsqueeze(0), patch_size) + patch_mbe(h2.unsqueeze(0), patch_size)).item(),
    )


def train_forgetting(tasks, mode, schedule, cfg):
    """One run: the student starts at theta0 and is trained with Adam on L1 (+ w * MBE) over the
    schedule's batches. Returns final metrics and curves."""
    steps_per_task, P = cfg.steps, cfg.patch_size
    model = ToyMLP()
    model.load_state_dict(tasks["theta0"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # One gate for the whole run, also across the task switch: the learner is not told that the
    # task changed, the gate must notice it from the loss like any other change.
    gate = GAPT(delta_ce=cfg.delta_ce, delta_mbe=cfg.delta_mbe,
                patience_mem=cfg.patience_mem, patience_comp=cfg.patience_comp,
                tau=cfg.tau)
    curve = dict(step=[], separation=[], loss1=[], loss2=[], mbe=[])
    phases = []  # per step: 2 if MBE was in the loss, else 1 (baseline all 1, iblm all 2)
    after_task1 = None

    def log_point(step):
        metrics = evaluate_forgetting(model, tasks, P)
        curve["step"].append(step)
        for k in ("separation", "loss1", "loss2", "mbe"):
            curve[k].append(metrics[k])
        return metrics

    batches = training_batches(tasks, schedule, steps_per_task, cfg.batch_size)
    for step, (x, y) in enumerate(batches):
        if step % cfg.eval_interval == 0:
            log_point(step)
        if schedule == "sequential" and step == steps_per_task:
            after_task1 = evaluate_forgetting(model, tasks, P)  # reference for forgetting
        out, h = model(x)
        l1 = F.l1_loss(out, y)
        m = patch_mbe(h.unsqueeze(0), P)  # (32, 20) -> (1, 32, 20): the batch is the sequence
        w = mbe_weight_for(mode, cfg.mbe_weight, gate)
        loss = iblm_loss(l1, m, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        phases.append(2 if w else 1)
        if mode == "gapt":
            gate.step(l1.detach(), m.detach())
    final = log_point(2 * steps_per_task)
    return dict(
        **final,
        # how much task 1's held-out loss rose while training on task 2 (sequential only)
        forgetting=final["loss1"] - after_task1["loss1"] if after_task1 else None,
        frac_compression=sum(p == 2 for p in phases) / len(phases),
        curve=curve,
        phase=phases,
    )


def mean_std(values):
    """Mean and sample std over seeds (std 0 for a single seed)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def summarize_forgetting(runs):
    """Mean/std over seeds per (schedule, mode), and separation relative to the baseline."""
    metrics = ("separation", "loss1", "loss2", "forgetting", "mbe", "frac_compression")
    summary = {}
    for schedule in FORGET_SCHEDULES:
        by_mode = {mode: [r for r in runs if r["schedule"] == schedule and r["mode"] == mode] for mode in FORGET_MODES}
        base_sep = {r["seed"]: r["separation"] for r in by_mode["baseline"]}
        summary[schedule] = {}
        for mode, rs in by_mode.items():
            s = {k: mean_std([r[k] for r in rs]) for k in metrics if rs[0][k] is not None}
            # the paper's kind of number: change of the mean separation ...
            s["sep_change_pct"] = 100 * (s["separation"][0] / mean_std(list(base_sep.values()))[0] - 1)
            # ... and its spread, against the same seed's baseline (paired: same data and batches)
            s["sep_change_pct_paired"] = mean_std([100 * (r["separation"] / base_sep[r["seed"]] - 1) for r in rs])
            summary[schedule][mode] = s
    return summary


def print_forgetting_table(summary, n_seeds):
    fmt = lambda ms: f"{ms[0]:7.3f} ± {ms[1]:5.3f}"
    print(f"\nConflicting memories, {n_seeds} seeds, mean ± std over seeds "
          f"(L1 and MBE on held-out data; forgetting = task-1 L1 rise during task 2)")
    header = f"{'schedule':<11}{'mode':<9}{'separation':>16}{'task1 L1':>16}{'task2 L1':>16}" \
             f"{'forgetting':>16}{'MBE':>16}{'comp%':>7}  sep vs baseline"
    print(header)
    print("-" * len(header))
    for schedule, modes in summary.items():
        for mode, s in modes.items():
            forgetting = fmt(s["forgetting"]) if "forgetting" in s else f"{'-':>15}"
            change = (f"{s['sep_change_pct']:+6.1f}% (paired {s['sep_change_pct_paired'][0]:+.1f} ± "
                      f"{s['sep_change_pct_paired'][1]:.1f}%)" if mode != "baseline" else "-")
            print(f"{schedule:<11}{mode:<9}{fmt(s['separation']):>16}{fmt(s['loss1']):>16}{fmt(s['loss2']):>16}"
                  f"{forgetting:>16}{fmt(s['mbe']):>16}{100 * s['frac_compression'][0]:6.0f}%  {change}")
    print(f"paper: GAPT improves separation by +{PAPER_SEPARATION_GAIN_PCT:.0f}% over the baseline")


def run_forgetting(cfg):
    """Every mode x schedule x seed, the table, and a JSON file with every number."""
    out_dir = cfg.out_dir
    t0 = time.time()
    runs = []
    for seed in range(cfg.seeds):
        tasks = make_forgetting_tasks(seed, n_train=cfg.steps * cfg.batch_size,
                                      n_eval=cfg.n_eval)
        for schedule in FORGET_SCHEDULES:
            for mode in FORGET_MODES:
                runs.append(dict(seed=seed, schedule=schedule, mode=mode,
                                 **train_forgetting(tasks, mode, schedule, cfg)))
    summary = summarize_forgetting(runs)
    print_forgetting_table(summary, cfg.seeds)
    result = dict(
        config=dict(cfg),
        paper_separation_gain_pct=PAPER_SEPARATION_GAIN_PCT,
        wall_s=time.time() - t0,
        summary=summary,
        runs=runs,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "forgetting.json")
    with open(path, "w") as f:
        json.dump(result, f)
    print(f"{len(runs)} runs in {result['wall_s']:.1f}s, all per-seed numbers and curves in {path}")
    return result


def load_config(argv):
    cfg = parse_config(argv, DEFAULTS)
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    if cfg.batch_size % (2 * cfg.patch_size):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of 2 * patch_size "
                         f"({2 * cfg.patch_size}), so that no MBE patch of a mixed batch mixes the two tasks")
    return cfg


if __name__ == "__main__":
    run_forgetting(load_config(sys.argv[1:]))
