"""
The conflicting-memories toy: the paper's claim that compression protects against catastrophic
forgetting. Compression phases (loss + lambda * MBE) squeeze each task's representation into a
compact cluster, so two conflicting tasks should end up with well separated representations
(paper: +97% separation for GAPT over plain training).

A student MLP learns two regression tasks whose teachers pull the weights in opposite directions
(theta0 + dtheta on inputs p1, theta0 - dtheta on inputs p2), either one after the other
(sequential) or interleaved (mixed), with L1 loss alone (baseline), L1 + lambda * MBE always
(iblm), or gapt.py's GAPT gate switching MBE on and off.

By default every sample is fresh (little to memorize) and each step is one batch of 32. The
author's public toy code (github.com/fangyuan-ksgk/mod_gpt, src/forget.py and conflict_exp.py)
works in another regime, which config/forgetting_author.py writes out: 500 training samples per
task drawn again and again, Adam at 1e-2, steps of 32 micro-batches, lambda = 10 under a soft floor,
pretraining on the mixture and then fine-tuning on task 1, and separation measured on one draw of
32 + 32 training samples (reported here next to ours, on 1,000 + 1,000 held-out samples).

    python -m experiments.forgetting                 # 5 seeds x 2 schedules x 3 modes, about 35 s on a CPU
    python -m experiments.forgetting --seeds=1 --steps=200
    python -m experiments.forgetting config/forgetting_author.py --out_dir=out-forgetting-author
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

from gapt import GAPT, check_writable, iblm_loss, mbe, parse_config, patch_mbe, phase_and_weight, rule, set_threads
from prepare_data import stop

DEFAULTS = dict(
    out_dir="out-forgetting",  # forgetting.json (every number and curve) goes here
    seeds=5,  # seeds 0..n-1; a seed fixes teacher, shift, data and batches for every mode
    steps=1000,  # optimizer steps per task (per phase); every schedule runs 2 * steps steps
    schedules="sequential,mixed",  # comma-separated, from SCHEDULES (author: pretrain_finetune)
    n_train=0,  # training samples per task: 0 = a fresh stream, each seen once; else a finite set drawn from at random (author: 500)
    batch_size=32,  # samples per micro-batch; this batch is the "sequence" MBE is taken over (paper: 32)
    micro_batches=1,  # micro-batches per optimizer step, their losses averaged (author: 32)
    patch_size=8,  # MBE patch length inside the batch (paper: 8, max MBE = log 8)
    lr=1e-3,  # Adam learning rate, fixed (no schedule: the task switch is the only event) (author: 1e-2)
    mbe_weight=1.0,  # lambda of L1 + lambda * MBE for iblm and for gapt's compression phase (paper: 1, author: 10)
    mbe_softness=0.0,  # s > 0: the author's soft floor, lambda * MBE -> 1e-5 + s * softplus((lambda * MBE - 1e-5) / s) (author: 0.1)
    n_eval=1000,  # held-out samples per distribution for separation, losses and MBE
    n_sep_train=32,  # training samples per task, one draw, for the author's separation (author: 32)
    eval_interval=20,  # steps between points of the logged curves
    delta_ce=0.01,  # gate: an L1 drop smaller than this is no progress (paper's value)
    delta_mbe=0.002,  # gate: an MBE drop smaller than this is no progress (paper's value)
    # The paper waits 125 steps of a 1750-step run (~7%). One task here is 1000 steps, so the same
    # fraction of a task is 125 * 1000 / 1750 ~= 70 steps: room for several cycles per task.
    patience_mem=70,  # gate: steps without L1 progress before compressing
    patience_comp=70,  # gate: steps without MBE progress before memorizing again
    tau=0.1,  # gate: relative L1 rise that aborts compression (paper's value)
    gate_signal="batch",  # what the gate sees: 'batch' (every micro-batch, as now and as the author), 'step_mean', 'ema'; patience counts its calls
    gate_ema=0.9,  # with gate_signal='ema': decay of the moving average of the step means (0.9: ~10 steps)
    threads=0,  # CPU threads; 0 = auto, as gapt.py's threads (the cores but one)
)
FORGET_MODES = ("baseline", "iblm", "gapt")
# sequential: task 1, then task 2. mixed: every batch half of each (the default table's two).
# pretrain_finetune (the author's): mixed, then task 1 alone, restarting Adam and the gate at the
# switch as the author's two runs (pretraining, fine-tuning) do.
FORGET_SCHEDULES = ("sequential", "mixed")
SCHEDULES = FORGET_SCHEDULES + ("pretrain_finetune",)
GATE_SIGNALS = ("batch", "step_mean", "ema")
MBE_FLOOR = 1e-5  # the author's floor under lambda * MBE (src/forget.py)
PAPER_SEPARATION_GAIN_PCT = 97.0  # the paper's headline for this toy, GAPT vs baseline
RULES = {  # what each key must be; the gate's keys as in gapt.RULES
    **rule(lambda v: v > 0, "positive", ("seeds", "steps", "batch_size", "micro_batches", "patch_size", "lr",
                                          "n_eval", "n_sep_train", "eval_interval")),
    **rule(lambda v: v >= 0, ">= 0", ("mbe_weight", "delta_ce", "delta_mbe", "patience_mem", "patience_comp", "tau",
                                       "threads")),
    **rule(lambda v: v >= 0, "0 (a fresh stream) or a number of samples", ("n_train",)),
    **rule(lambda v: v >= 0, ">= 0 (0: no floor)", ("mbe_softness",)),
    **rule(lambda v: 0 <= v < 1, "in [0, 1) (0: no smoothing)", ("gate_ema",)),
    **rule(lambda v: v != "", "a non-empty path", ("out_dir",)),
    # as many known names as names: none unknown, none twice
    **rule(lambda v: len(set(v.split(",")) & set(SCHEDULES)) == len(v.split(",")),
           f"distinct names from {','.join(SCHEDULES)}, comma-separated", ("schedules",)),
    **rule(lambda v: v in GATE_SIGNALS, f"one of {', '.join(GATE_SIGNALS)}", ("gate_signal",)),
}


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
    """Everything random about one seed: the student's start theta0, both tasks' training samples
    (n_train each: a stream consumed in order or a finite set drawn from, the same for every mode)
    and a held-out evaluation set per task, drawn from its own generator so it does not depend on
    n_train. Defaults match steps * batch_size and n_eval."""
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


def step_tasks(schedule, step, steps_per_task):
    """The tasks one step's batches come from, in the order they fill each batch."""
    first_half = step < steps_per_task
    if schedule == "sequential":
        return (1,) if first_half else (2,)
    if schedule == "pretrain_finetune":
        return (1, 2) if first_half else (1,)
    return (1, 2)


def stream_length(schedule, steps_per_task, step_samples):
    """Fresh samples the busiest task gives a run: steps * step_samples in the sequential and mixed
    schedules; pretrain_finetune takes half of that from task 1 in pretraining, then all of it."""
    return steps_per_task * step_samples * (3 if schedule == "pretrain_finetune" else 2) // 2


def training_batches(tasks, schedule, steps_per_task, batch_size, micro_batches=1, generator=None):
    """Yields 2 * steps_per_task (x, y) steps of micro_batches batches of batch_size samples, one
    batch after the other. A batch of one task's samples, or half task 1 then half task 2 (mixed
    steps), so that with batch_size / 2 a multiple of the patch size no MBE patch mixes the tasks:
    MBE measures within-task entropy in every schedule (a mixed patch would instead reward making
    the two tasks' representations parallel, i.e. less separated). Without a generator each task's
    samples are a stream consumed in order, so sequential and mixed consume the same samples; with
    one, every batch draws distinct samples of each task's finite set at random (the author's
    get_batch), the same draws for every mode of a seed."""
    cursor = {1: 0, 2: 0}

    def take(task, n):
        if generator is None:
            rows = slice(cursor[task], cursor[task] + n)
            cursor[task] += n
            if cursor[task] > len(tasks[f"x{task}_train"]):
                raise ValueError(f"task {task}'s stream is too short for this schedule: size it with stream_length")
        else:
            rows = torch.randperm(len(tasks[f"x{task}_train"]), generator=generator)[:n]
        return tasks[f"x{task}_train"][rows], tasks[f"y{task}_train"][rows]

    for step in range(2 * steps_per_task):
        task_ids = step_tasks(schedule, step, steps_per_task)
        parts = [take(task, batch_size // len(task_ids)) for _ in range(micro_batches) for task in task_ids]
        yield torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


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


@torch.no_grad()
def training_separation(model, tasks, n, seed):
    """The author's separation: one random draw of n training samples per task (the same draw for
    every mode of a seed). In the fresh-stream regime a training sample was seen at most once."""
    g = torch.Generator().manual_seed(2_000_000 + seed)
    h1, h2 = (model(tasks[f"x{task}_train"][torch.randperm(len(tasks[f"x{task}_train"]), generator=g)[:n]])[1]
              for task in (1, 2))
    return separation(h1, h2)


def micro_batch_losses(model, x, y, micro_batches, patch_size):
    """L1 and patch MBE of each micro-batch, (K,) each, from one forward pass over the step's
    samples: the weights do not change between micro-batches, so this is K forward passes in one."""
    out, h = model(x)
    l1 = (out - y).abs().view(micro_batches, -1).mean(1)
    # (K * B, 20) -> (K, B / P, P, 20): each micro-batch is a "sequence" cut into patches, as patch_mbe does
    m = mbe(h.view(micro_batches, -1, patch_size, h.size(-1))).mean(1)
    return l1, m


def penalized_loss(l1, m, weight, softness):
    """iblm_loss, or with softness > 0 the author's soft floor on weight * MBE, whose gradient fades
    to half as weight * MBE falls below ~softness (src/forget.py, use_softplus)."""
    if softness == 0 or not weight:
        return iblm_loss(l1, m, weight)
    return l1 + MBE_FLOOR + softness * F.softplus((weight * m - MBE_FLOOR) / softness)


def gate_input(step_mean, previous, cfg):
    """(L1, MBE) the gate sees once per step: the mean over the step's micro-batches, or with
    gate_signal='ema' its moving average (starting at the first step's), so that the tau rule reacts
    to the loss and not to the noise of a 32-sample batch."""
    if previous is None or cfg.gate_signal == "step_mean":
        return step_mean
    return cfg.gate_ema * previous + (1 - cfg.gate_ema) * step_mean


def new_optimizer_and_gate(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr), GAPT(
        delta_ce=cfg.delta_ce, delta_mbe=cfg.delta_mbe, patience_mem=cfg.patience_mem,
        patience_comp=cfg.patience_comp, tau=cfg.tau)


def train_forgetting(tasks, mode, schedule, cfg, seed=0):
    """One run: the student starts at theta0 and is trained with Adam on L1 (+ w * MBE) over the
    schedule's batches; with n_train > 0, seed fixes the draws from the finite sets. Returns final
    metrics and curves."""
    steps_per_task, P, K = cfg.steps, cfg.patch_size, cfg.micro_batches
    model = ToyMLP()
    model.load_state_dict(tasks["theta0"])
    # One gate for the whole run, also across the task switch: the learner is not told that the
    # task changed, the gate must notice it from the loss like any other change. Only
    # pretrain_finetune starts both again, the author's fine-tuning being a run of its own.
    optimizer, gate = new_optimizer_and_gate(model, cfg)
    smoothed = None  # gate_signal='ema': the moving average of (L1, MBE) the gate sees
    curve = dict(step=[], separation=[], loss1=[], loss2=[], mbe=[])
    phases = []  # per step: 2 if MBE was in the loss (of any micro-batch), else 1 (baseline all 1, iblm all 2)
    n_compressing = 0  # micro-batches with MBE in the loss
    after_task1 = None

    def log_point(step):
        metrics = evaluate_forgetting(model, tasks, P)
        curve["step"].append(step)
        for k in ("separation", "loss1", "loss2", "mbe"):
            curve[k].append(metrics[k])
        return metrics

    reuse = torch.Generator().manual_seed(seed) if cfg.n_train else None
    batches = training_batches(tasks, schedule, steps_per_task, cfg.batch_size, K, reuse)
    for step, (x, y) in enumerate(batches):
        if step % cfg.eval_interval == 0:
            log_point(step)
        if schedule == "sequential" and step == steps_per_task:
            after_task1 = evaluate_forgetting(model, tasks, P)  # reference for forgetting
        if schedule == "pretrain_finetune" and step == steps_per_task:
            optimizer, gate = new_optimizer_and_gate(model, cfg)  # fine-tuning is a new run
            smoothed = None
        l1, m = micro_batch_losses(model, x, y, K, P)
        if mode == "gapt" and cfg.gate_signal == "batch":
            # each micro-batch gets the phase the gate is in when it comes, then moves the gate
            weights = []
            for k in range(K):
                weights.append(phase_and_weight(mode, cfg.mbe_weight, gate)[1])
                gate.step(l1[k].detach(), m[k].detach())
        else:
            weights = [phase_and_weight(mode, cfg.mbe_weight, gate)[1]] * K
            if mode == "gapt":  # one gate step per optimizer step
                smoothed = gate_input(torch.stack([l1.mean(), m.mean()]).detach(), smoothed, cfg)
                gate.step(*smoothed)
        loss = sum(penalized_loss(l1[k], m[k], weights[k], cfg.mbe_softness) for k in range(K)) / K
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        compressing = sum(bool(w) for w in weights)
        phases.append(2 if compressing else 1)
        n_compressing += compressing
    final = log_point(2 * steps_per_task)
    return dict(
        **final,
        separation_train=training_separation(model, tasks, cfg.n_sep_train, seed),
        # how much task 1's held-out loss rose while training on task 2 (sequential only)
        forgetting=final["loss1"] - after_task1["loss1"] if after_task1 else None,
        frac_compression=n_compressing / (K * len(phases)),
        curve=curve,
        phase=phases,
    )


def mean_std(values):
    """Mean and sample std over seeds (std 0 for a single seed)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def change_vs_baseline(runs, baseline_runs, key):
    """The paper's kind of number, the change of the mean of `key` against the baseline's, and its
    mean ± std against the same seed's baseline (paired: same data and batches), in %."""
    base = {r["seed"]: r[key] for r in baseline_runs}
    return (100 * (mean_std([r[key] for r in runs])[0] / mean_std(list(base.values()))[0] - 1),
            mean_std([100 * (r[key] / base[r["seed"]] - 1) for r in runs]))


def summarize_forgetting(runs):
    """Mean/std over seeds per (schedule, mode), and both separations relative to the baseline."""
    metrics = ("separation", "separation_train", "loss1", "loss2", "forgetting", "mbe", "frac_compression")
    summary = {}
    for schedule in dict.fromkeys(r["schedule"] for r in runs):
        by_mode = {mode: [r for r in runs if r["schedule"] == schedule and r["mode"] == mode] for mode in FORGET_MODES}
        summary[schedule] = {}
        for mode, rs in by_mode.items():
            s = {k: mean_std([r[k] for r in rs]) for k in metrics if rs[0][k] is not None}
            s["sep_change_pct"], s["sep_change_pct_paired"] = change_vs_baseline(rs, by_mode["baseline"], "separation")
            s["sep_train_change_pct"], s["sep_train_change_pct_paired"] = change_vs_baseline(
                rs, by_mode["baseline"], "separation_train")
            summary[schedule][mode] = s
    return summary


def print_forgetting_table(summary, n_seeds):
    fmt = lambda ms: f"{ms[0]:7.3f} ± {ms[1]:5.3f}"
    change = lambda s, key: f"{s[key]:+6.1f}% (paired {s[key + '_paired'][0]:+.1f} ± {s[key + '_paired'][1]:.1f}%)"
    print(f"\nConflicting memories, {n_seeds} seeds, mean ± std over seeds (L1 and MBE on held-out data; "
          f"forgetting = task-1 L1 rise during task 2; sep train = on one draw of training samples)")
    header = f"{'schedule':<18}{'mode':<9}{'separation':>16}{'sep train':>16}{'task1 L1':>16}{'task2 L1':>16}" \
             f"{'forgetting':>16}{'MBE':>16}{'comp%':>7}  {'sep vs baseline':<33}sep train vs baseline"
    print(header)
    print("-" * len(header))
    for schedule, modes in summary.items():
        for mode, s in modes.items():
            forgetting = fmt(s["forgetting"]) if "forgetting" in s else f"{'-':>15}"
            changes = (f"{change(s, 'sep_change_pct'):<33}{change(s, 'sep_train_change_pct')}"
                       if mode != "baseline" else "-")
            print(f"{schedule:<18}{mode:<9}{fmt(s['separation']):>16}{fmt(s['separation_train']):>16}"
                  f"{fmt(s['loss1']):>16}{fmt(s['loss2']):>16}{forgetting:>16}{fmt(s['mbe']):>16}"
                  f"{100 * s['frac_compression'][0]:6.0f}%  {changes}")
    print(f"paper: GAPT improves separation by +{PAPER_SEPARATION_GAIN_PCT:.0f}% over the baseline")


def run_forgetting(cfg):
    """Every mode x schedule x seed, the table, and a JSON file with every number."""
    set_threads(cfg.threads)
    out_dir = cfg.out_dir
    t0 = time.time()
    runs = []
    for seed in range(cfg.seeds):
        for schedule in cfg.schedules.split(","):
            n_train = cfg.n_train or stream_length(schedule, cfg.steps, cfg.micro_batches * cfg.batch_size)
            tasks = make_forgetting_tasks(seed, n_train=n_train, n_eval=cfg.n_eval)
            for mode in FORGET_MODES:
                runs.append(dict(seed=seed, schedule=schedule, mode=mode,
                                 **train_forgetting(tasks, mode, schedule, cfg, seed)))
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
    cfg = parse_config(argv, DEFAULTS, RULES)
    if cfg.batch_size % (2 * cfg.patch_size):
        stop(f"batch_size ({cfg.batch_size}) must be a multiple of 2 * patch_size "
             f"({2 * cfg.patch_size}), so that no MBE patch of a mixed batch mixes the two tasks")
    if cfg.n_eval % cfg.patch_size:
        stop(f"n_eval ({cfg.n_eval}) must be a multiple of patch_size ({cfg.patch_size}): "
             f"the held-out MBE cuts each task's samples into whole patches")
    if cfg.n_train and cfg.n_train < max(cfg.batch_size, cfg.n_sep_train):
        stop(f"n_train must be 0 (a fresh stream) or at least batch_size and n_sep_train "
             f"({max(cfg.batch_size, cfg.n_sep_train)}): a draw takes distinct samples, got {cfg.n_train}")
    check_writable(cfg.out_dir)  # now, not after every run has been trained
    return cfg


if __name__ == "__main__":
    run_forgetting(load_config(sys.argv[1:]))
