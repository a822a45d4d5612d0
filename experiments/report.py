"""
Figures and tables from what runs left in their out_dir: log.jsonl of gapt.py runs (and sample.py's
eval_arithmetic.json and eval_val.json beside it), or forgetting.json of the toy. Everything can be redrawn from the
logs alone. matplotlib is needed here only.

    python -m experiments.report --runs=out-a,out-b --file=assets/runs.png   # figure + markdown tables
    python -m experiments.report --runs=out-forgetting --file=assets/forgetting.png
"""

import json
import math
import os
import sys

import numpy as np

from gapt import DEFAULTS as DEFAULTS_OF_GAPT, parse_config, read_log, rule
from prepare_data import stop

DEFAULTS = dict(
    runs="",  # comma-separated out_dirs of the runs to draw (or one forgetting out_dir)
    file="",  # where the figure goes ('': runs.png in the first run's folder, never over assets/'s committed ones)
    align_window=0,  # steps per column of the alignment-cosine table (0: the runs' eval_interval)
    learned_exact_match=0.3,  # val exact match from which an arithmetic run counts as having learned the task
)
RULES = {
    **rule(lambda v: v >= 0, ">= 0 (0: the runs' eval_interval)", ("align_window",)),
    **rule(lambda v: 0 <= v <= 1, "in [0, 1]", ("learned_exact_match",)),
}


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        stop("figures need matplotlib, which training does not: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def start_configs(rows):
    """The config of each start row: one, or one more per resume."""
    return [r["config"] for r in rows if r.get("event") == "start"]


def start_config(rows):
    return start_configs(rows)[0]


def setting(configs, key):
    """A run's value of a setting: a key an older gapt.py did not log has its default, and a run
    resumed with another value shows each value in turn (0.1 -> 1.0)."""
    values = [str(config.get(key, DEFAULTS_OF_GAPT.get(key))) for config in configs]
    return " -> ".join(v for i, v in enumerate(values) if i == 0 or v != values[i - 1])


def read_run(out_dir):
    """(mode, rows) of a run: its mode from the start row, and every row of its log. A run resumed
    with another mode is refused rather than labelled: the tables compare modes, its compression share
    is defined per mode, and a run of two modes belongs to neither."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isdir(out_dir):
        stop(f"--runs: {out_dir} is {'a file' if os.path.exists(out_dir) else 'not there'}; "
             f"--runs takes the out_dirs of gapt.py runs, comma-separated")
    if not os.path.exists(path):
        stop(f"no {path}; --runs takes the out_dirs of gapt.py runs, comma-separated")
    rows = [r for r in read_log(path) if isinstance(r, dict)]  # like a torn line, a line that is no row is left out
    configs = start_configs(rows)
    if not configs:
        stop(f"{path} has no start row: it is empty or not a gapt.py log; --runs takes the out_dirs of gapt.py runs")
    if len({config["mode"] for config in configs}) > 1:
        stop(f"{path}: the run was resumed with another --mode ({setting(configs, 'mode')}), so it compares with "
             f"neither mode; leave it out of --runs")
    for row in rows:  # logs written before gapt.py logged val_mbe_all: the same mean, from the blocks
        if "val_mbe_blocks" in row and "val_mbe_all" not in row:
            row["val_mbe_all"] = float(np.mean(row["val_mbe_blocks"]))
    return start_config(rows)["mode"], rows


def compression_spans(rows, last_iter):
    """[(first, last)] iterations of each compression phase, from the phase_change rows."""
    spans, start = [], None
    for r in rows:
        if r.get("event") == "phase_change":
            if r["phase"] == 2:
                start = r["iter"]
            elif start is not None:
                spans.append((start, r["iter"]))
                start = None
    return spans + ([(start, last_iter)] if start is not None else [])


PLOT_PANELS = [("ce", "training CE"), ("mbe", "training MBE_reg"), ("val_mbe", "val MBE_reg (regularized)"),
               ("val_mbe_all", "val MBE (all blocks)"), ("val_ood_answer_ce", "OOD answer CE (val_ood)"),
               ("val_ood_answer_ce_in_context", "OOD answer CE in context"), ("val_answer_ce", "ID answer CE (val)"),
               ("val_ce", "validation CE"), ("align_cos", "cos(grad CE, grad MBE_reg)")]
MODE_COLORS = dict(baseline="tab:gray", iblm="tab:blue", gapt="tab:red")
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (9, 3)))  # a mode's settings (lambda 1, 0.03, ...)


def mean_curve(curves):
    """The mean of several runs' [(iter, value)] curves, at the iterations every one of them logged."""
    by_iter = [dict(curve) for curve in curves]
    iters = sorted(set.intersection(*(set(d) for d in by_iter)))
    return iters, [sum(d[it] for d in by_iter) / len(by_iter) for it in iters]


def line_groups(runs):
    """[(label, mode, line style, [rows of each run])] from [(mode, rows)]: one line (the mean of its
    seeds) per mode and setting, so that the runs of a lambda curve are never averaged together; the
    settings of one mode differ by line style, the modes by color."""
    groups = {}
    for label, (mode, rows) in zip(setting_labels(runs), runs):
        if label not in groups:
            style = LINE_STYLES[sum(m == mode for _, m, _, _ in groups.values()) % len(LINE_STYLES)]
            groups[label] = (label, mode, style, [])
        groups[label][3].append(rows)
    return list(groups.values())


def plot_training_runs(run_dirs):
    """The figure: one panel per quantity the runs logged; GAPT's compression phases shaded in its color.
    A mode with several seeds is drawn as thin seed lines under a bold mean: with 5 seeds of 3 modes,
    15 lines of equal weight hide the comparison the figure is for."""
    plt = import_pyplot()
    runs = [read_run(d) for d in run_dirs]
    groups = line_groups(runs)
    panels = [(key, title) for key, title in PLOT_PANELS if any(key in r for _, rows in runs for r in rows)]
    if not panels:
        stop(f"nothing to draw: no run in --runs has logged a step or an evaluation yet; report them after "
             f"their first log_interval")
    # the phases of several GAPT seeds overlap and shade darker
    spans = [span for mode, rows in runs if mode == "gapt" for span in compression_spans(rows, rows[-1]["iter"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        for label, mode, style, members in groups:
            curves = [(f"{label} seed {start_config(rows)['seed']}",
                       [(r["iter"], r[key]) for r in rows if r.get(key) is not None]) for rows in members]
            curves = [(name, curve) for name, curve in curves if curve]
            several = len(curves) > 1
            for name, curve in curves:
                ax.plot(*zip(*curve), color=MODE_COLORS[mode], ls=style, lw=0.6 if several else 1,
                        alpha=0.35 if several else 0.8, label=None if several else name)
            if several:
                ax.plot(*mean_curve([curve for _, curve in curves]), color=MODE_COLORS[mode], ls=style, lw=2,
                        label=f"{label}, mean of {len(curves)} seeds")
        for first, last in spans:
            ax.axvspan(first, last, color=MODE_COLORS["gapt"], alpha=0.08, lw=0)
        if key == "align_cos":
            ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(title, fontsize=8)
    longest = max(len(label) for label in axes[0, 0].get_legend_handles_labels()[1])
    axes[0, 0].legend(fontsize=7, ncol=3 if longest < 40 else 1)  # long setting labels stay inside the panel
    if spans:
        axes[0, 0].set_title("shaded: GAPT compression phases (darker where more seeds compress)", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def read_json(path, keys, fix):
    """What another program here wrote to path, or one line saying it is not that."""
    try:
        with open(path) as f:
            result = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        stop(f"{path} is not JSON ({e}); {fix}")
    missing = [key for key in keys if not isinstance(result, dict) or key not in result]
    if missing:
        stop(f"{path} has no {', '.join(missing)}; {fix}")
    return result


def plot_forgetting(json_path):
    """Figure of the conflicting-memories toy from forgetting.json: separation per mode (mean and std
    over seeds, both schedules) and separation over training steps (mean over seeds)."""
    plt = import_pyplot()
    result = read_json(json_path, ("summary", "runs", "config", "paper_separation_gain_pct"),
                       f"rerun python -m experiments.forgetting --out_dir={os.path.dirname(json_path)}")
    summary, runs, steps_per_task = result["summary"], result["runs"], result["config"]["steps"]
    schedules = list(summary)
    modes = list(summary[schedules[0]])
    colors = MODE_COLORS

    fig, axes = plt.subplots(1, 1 + len(schedules), figsize=(5 + 5 * len(schedules), 4))
    ax = axes[0]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(schedules))]
        means = [summary[s][mode]["separation"][0] for s in schedules]
        stds = [summary[s][mode]["separation"][1] for s in schedules]
        ax.bar(xs, means, width, yerr=stds, capsize=4, color=colors.get(mode), label=mode)
        for x, s in zip(xs, schedules):
            if mode != "baseline":
                ax.annotate(f"{summary[s][mode]['sep_change_pct']:+.0f}%", (x, 0), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=8, color="white")
    ax.set_xticks(range(len(schedules)), schedules)
    ax.set_ylabel("separation  ||mu1 - mu2|| / sqrt(within)")
    n_seeds = len({r["seed"] for r in runs})
    ax.set_title(f"final separation, mean ± std over {n_seeds} seeds\n"
                 f"(% = change vs baseline; paper: GAPT +{result['paper_separation_gain_pct']:.0f}%)", fontsize=9)
    ax.legend(fontsize=8)

    for ax, schedule in zip(axes[1:], schedules):
        for mode in modes:
            curves = [r["curve"] for r in runs if r["schedule"] == schedule and r["mode"] == mode]
            steps = curves[0]["step"]
            mean = [sum(c["separation"][i] for c in curves) / len(curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=colors.get(mode), label=mode)
        switch = dict(sequential="task 2 starts ", pretrain_finetune="fine-tuning on task 1 starts ").get(schedule)
        if switch:
            ax.axvline(steps_per_task, color="k", ls=":", lw=1)
            ax.text(steps_per_task, 0.5, switch, transform=ax.get_xaxis_transform(),
                    rotation=90, ha="right", va="center", fontsize=8)
        # where the GAPT gate compressed (seed 0), as ticks along the bottom: a step with MBE in the
        # loss of any of its micro-batches
        gapt0 = next((r for r in runs if r["schedule"] == schedule and r["mode"] == "gapt" and r["seed"] == 0), None)
        if gapt0:
            on = [i for i, p in enumerate(gapt0["phase"]) if p == 2]
            ax.plot(on, [0.02] * len(on), "|", color=colors["gapt"], ms=6, transform=ax.get_xaxis_transform())
        ax.set_xlabel("step")
        ax.set_ylabel("separation (mean over seeds)")
        ax.set_title(f"{schedule} schedule: separation during training\n"
                     "(red ticks: steps GAPT compressed in, any micro-batch, seed 0)", fontsize=9)
    fig.tight_layout()
    return fig


SUMMARY_KEYS = ("val_ce", "min_val_ce", "val_mbe", "val_mbe_all", "whole_val_ce", "whole_val_mbe_all", "val_answer_ce", "val_ood_answer_ce",
                "val_answer_ce_in_context", "val_ood_answer_ce_in_context", "val_exact_match", "val_ood_exact_match",
                "min_test_ood_answer_ce", "val_ood_answer_ce_at_min_test_ood", "compressing", "compression_phases",
                "min_val_ce_iter", "val_ce_rise", "val_train_gap", "compressed_before_min", "compression_phase_steps",
                "gate_ce_noise", "noise_phase_steps")
SELECTED_KEYS_NOTE = ("whole_val_*: over the whole val split (sample.py --eval=val), where val_* read eval_iters "
                      "batches of it; min_*: the lowest over the run's evaluations, not the final one, min_val_ce_iter its step; "
                      "val_ce_rise: final minus lowest val CE (> 0: the run overfits); val_train_gap: final val minus "
                      "train CE; compressed_before_min: 1 if the run compressed before its lowest val CE; "
                      "*_at_min_test_ood: at the evaluation with the lowest test_ood answer CE (early stopping on an "
                      "OOD test split, the author's leak, measured); compression_phase_steps: the mean length of "
                      "the run's compression phases; gate_ce_noise: the step-to-step relative spread of the training "
                      "CE the gate reads; noise_phase_steps: the median length of a compression phase that this noise "
                      "alone ends by the tau rule (simulated on a flat CE)")
DIGIT_KEYS = ("exact_match", "end_ce", "length_bias", "leading_digit_accuracy", "leading_two_digits_accuracy",
              "last_digit_accuracy")  # read from sample.py's eval_arithmetic.json, per split
BLOCK_TABLES = {  # per-block lists in the eval rows, and what each table shows
    "val_mbe_blocks": "validation MBE of each block's output",
    "val_mbe_centred_blocks": "validation MBE of each block's patches with their mean token removed",
    "val_top_share_blocks": "the largest eigenvalue's share of each block's patch Gram matrix",
    "val_mbe_alpha1_blocks": "validation alpha-1 (von Neumann) MBE of each block",
}


def final_metrics(out_dir, rows):
    """A run's last evaluation (at max_iters: a fixed step, never the best one, so nothing is
    chosen on a validation or OOD split), plus sample.py's whole-split CE and MBE if eval_val.json exists
    and its exact match if eval_arithmetic.json does, plus the selected values named by
    SELECTED_KEYS_NOTE, each labelled as such."""
    evals = [r for r in rows if r.get("event") == "eval"]
    last = evals[-1]
    lowest = min(evals, key=lambda r: r["val_ce"])  # the first of equal lowest ones
    metrics = dict(last, min_val_ce=lowest["val_ce"], min_val_ce_iter=lowest["iter"],
                   val_ce_rise=last["val_ce"] - lowest["val_ce"],
                   seed=start_config(rows).get("seed", DEFAULTS_OF_GAPT["seed"]))
    if "train_ce" in last:
        metrics["val_train_gap"] = last["val_ce"] - last["train_ce"]
    if all("test_ood_answer_ce" in r for r in evals):
        # what stopping on an OOD *test* loss reports (the minimum of the metric it selects on), and
        # what the independent val_ood says at that step
        chosen = min(evals, key=lambda r: r["test_ood_answer_ce"])
        metrics.update(min_test_ood_answer_ce=chosen["test_ood_answer_ce"],
                       val_ood_answer_ce_at_min_test_ood=chosen["val_ood_answer_ce"])
    # the share of steps with MBE_reg in the loss, and in how many phases: fixed for baseline and iblm
    mode = start_config(rows)["mode"]
    spans = compression_spans(rows, last["iter"])
    metrics["compressing"] = dict(baseline=0.0, iblm=1.0).get(mode, sum(b - a for a, b in spans) / last["iter"])
    metrics["compression_phases"] = dict(baseline=0, iblm=1).get(mode, len(spans))
    metrics["compression_phase_steps"] = metrics["compressing"] * last["iter"] / max(1, metrics["compression_phases"])
    metrics.update(gate_noise(rows))
    # the paper's claim is on the best model: could compression have shaped it, or did it come after?
    first = dict(baseline=None, iblm=0).get(mode, spans[0][0] if spans else None)
    metrics["compressed_before_min"] = float(first is not None and first < lowest["iter"])
    for key in BLOCK_TABLES:
        for block, value in enumerate(last.get(key, [])):
            metrics[f"{key} {block}"] = value
    path = os.path.join(out_dir, "eval_val.json")
    if os.path.exists(path):
        result = read_json(path, ("ce", "mbe_all"), f"rerun python sample.py --eval=val --out_dir={out_dir}, or delete it")
        metrics.update(whole_val_ce=result["ce"], whole_val_mbe_all=result["mbe_all"])
    path = os.path.join(out_dir, "eval_arithmetic.json")
    if os.path.exists(path):
        result = read_json(path, ("rows",),
                           f"rerun python sample.py --eval=arithmetic --out_dir={out_dir}, or delete it")
        for row in result["rows"]:  # the greedy answers' scores, and item by item what the answer CE mixes
            metrics.update({f"{row['split']}_{key}": row[key] for key in DIGIT_KEYS if key in row})
            if row.get("answer_ce_from_first"):  # the CE of the product's leading and last digit
                metrics.update({f"{row['split']}_leading_digit_ce": row["answer_ce_from_first"][0],
                                f"{row['split']}_last_digit_ce": row["answer_ce_from_last"][0]})
    return metrics


def gate_noise(rows, trials=2000):
    """How soon the tau rule ends a compression phase on batch noise alone. The gate reads one step's
    training CE, whose spread from batch to batch shrinks with the tokens per step (the paper's steps
    read 500 times ours); a phase ends at the first CE above (1 + tau) times the phase's lowest, so a
    noisy CE ends it within a few steps without any real rise. The spread comes from the logged
    memorization-phase CEs after warmup (their step-to-step log-ratio has twice the variance of one CE's);
    the phase length from `trials` simulated phases of a flat CE with that spread. {} for too short a log."""
    config = start_config(rows)
    warmup, tau, patience = (config.get(k, DEFAULTS_OF_GAPT[k]) for k in ("warmup_iters", "tau", "patience_comp"))
    logged = [(r["ce"], r["phase"]) for r in rows if "ce" in r and "event" not in r and r["iter"] > warmup]
    ratios = [math.log(b / a) for (a, p), (b, q) in zip(logged, logged[1:]) if p == q == 1]
    if len(ratios) < 10:
        return {}
    spread = float(np.std(ratios, ddof=1) / math.sqrt(2))
    ce = np.exp(spread * np.random.default_rng(0).standard_normal((trials, patience)))  # (trials, steps)
    spike = ce > (1 + tau) * np.minimum.accumulate(ce, axis=1)
    lengths = np.where(spike.any(axis=1), spike.argmax(axis=1) + 1, patience)
    return dict(gate_ce_noise=spread, noise_phase_steps=float(np.median(lengths)))


def reference_row(labels):
    """The row changes are measured against: the plain "baseline", else the first baseline row (None
    without one)."""
    return "baseline" if "baseline" in labels else next((m for m in labels if m.startswith("baseline")), None)


def mode_table(by_mode, keys, headers=None):
    """Markdown rows: mean ± std of each key over each mode's runs (the value alone for one run: one
    run has no spread), and the change of the mean against the reference row's over the seeds both
    rows have (seeds differ by more than many effects: a one-seed row against a three-seed mean would
    mostly measure its seed)."""
    reference = reference_row(by_mode)
    lines = ["| mode | runs | " + " | ".join(headers or keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for mode, ms in by_mode.items():
        shared = {m["seed"] for m in ms} & {m["seed"] for m in by_mode.get(reference, [])}
        cells = []
        for k in keys:
            values = [m[k] for m in ms]
            cell = f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")
            if shared and mode != reference:
                ours, theirs = (np.mean([m[k] for m in by_mode[row] if m["seed"] in shared]) for row in (mode, reference))
                if theirs:
                    cell += f" ({100 * (ours / theirs - 1):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {mode} | {len(ms)} | " + " | ".join(cells) + " |")
    return lines


def alignment_table(runs_by_mode, window):
    """Markdown rows for the cycle: per mode, cos(grad CE, grad MBE_reg) in consecutive windows of
    `window` steps, mean ± standard error over every measurement of every run in the window (one
    micro-batch is a noisy gradient: single measurements flip sign often), then how many were > 0."""
    last = max(r["iter"] for rows in sum(runs_by_mode.values(), []) for r in rows if "align_cos" in r)
    starts = range(0, last + 1, window)
    lines = ["| mode | runs | sign changes per run | " + " | ".join(f"{a}-{a + window - 1}" for a in starts) + " |",
             "|---|---:|---:|" + "---:|" * len(starts)]
    for mode, runs in runs_by_mode.items():
        series = [[(r["iter"], r["align_cos"]) for r in rows if "align_cos" in r] for rows in runs]
        flips = np.mean([sum((a > 0) != (b > 0) for (_, a), (_, b) in zip(s, s[1:])) for s in series])
        cells = []
        for a in starts:
            values = [c for s in series for it, c in s if a <= it < a + window]
            se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):+.2f} ± {se:.2f} ({sum(v > 0 for v in values)}/{len(values)})"
                         if values else "")
        lines.append(f"| {mode} | {len(runs)} | {flips:.1f} | " + " | ".join(cells) + " |")
    return lines


SAME_PROTOCOL_KEYS = ("seed", "out_dir", "init_from", "data_dir")  # never split a mode's runs into rows
KEY_NAMES = dict(mbe_weight="lambda")


def setting_labels(runs):
    """A row label per (mode, rows): the mode, then each setting that differs between that mode's runs
    (a lambda curve, the half-batch baseline, the gate reading test_ood), so that runs of different
    protocols are never averaged together; a run resumed with another setting is labelled by each value
    it ran with."""
    configs = [start_configs(rows) for _, rows in runs]
    labels = []
    for (mode, _), config in zip(runs, configs):
        peers = [c for (m, _), c in zip(runs, configs) if m == mode]
        varying = [k for k in DEFAULTS_OF_GAPT
                   if k not in SAME_PROTOCOL_KEYS and len({setting(c, k) for c in peers}) > 1]
        labels.append(" ".join([mode] + [f"{KEY_NAMES.get(k, k)} {setting(config, k)}" for k in varying]))
    return labels


# t_0.975 of Student t for 1..30 degrees of freedom (the standard table); beyond, the Cornish-Fisher series
# in 1/df to second order, within 1e-4 of the exact quantile there
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_975(df):
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964  # the normal quantile, the limit
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_and_interval(values, fmt):
    """The mean of paired changes and its 95% t-interval over the seeds (n - 1 degrees of freedom)."""
    mean = np.mean(values)
    if len(values) == 1:
        return f"{fmt.format(mean)} (1 seed: no interval)"
    half = t_975(len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return f"{fmt.format(mean)} [{fmt.format(mean - half)}, {fmt.format(mean + half)}]"


PAIRED_KEYS = ("val_ce", "min_val_ce", "min_val_ce_iter", "val_mbe_all", "whole_val_ce", "whole_val_mbe_all", "val_ood_answer_ce", "val_ood_answer_ce_in_context",
               "val_answer_ce", "val_exact_match", "val_ood_exact_match",
               # what the OOD answer CE mixes, apart (sample.py --eval=arithmetic): does the model know where
               # the product ends, or its digits?
               "val_ood_end_ce", "val_ood_leading_digit_ce", "val_ood_last_digit_ce", "val_ood_length_bias",
               "val_ood_leading_digit_accuracy", "val_ood_last_digit_accuracy")


def runs_by_seed(runs):
    """{seed: [(out_dir, final metrics)]} from [(out_dir, rows, final metrics)]."""
    groups = {}
    for out_dir, _, metrics in runs:
        groups.setdefault(metrics["seed"], []).append((out_dir, metrics))
    return groups


def paired_table(evaluated, reference, learned_exact_match):
    """Markdown rows comparing each row with the reference row seed by seed (runs of different seeds
    differ by more than many effects): per key the change of every pair of runs of one seed, their mean
    and its 95% t-interval, also relative to the reference run; and whether the pairs are informative:
    on arithmetic both runs learned the in-distribution task, on text the reference run memorized (its
    validation CE rose after its lowest), the regime the paper's claim is about. Runs without a partner
    are named, not paired."""
    references = runs_by_seed(evaluated[reference])
    lines = ["| row | n seeds | informative | metric | change per seed | mean change [95% CI] | "
             "mean change % [95% CI] |", "|---|---:|---|---|---|---:|---:|"]
    notes = []
    for label, runs in evaluated.items():
        if label == reference:
            continue
        arms = runs_by_seed(runs)
        seeds = sorted(s for s in set(references) & set(arms) if len(references[s]) == len(arms[s]) == 1)
        left_out = [f"{out_dir} (seed {seed}: {len(references.get(seed, []))} {reference} and "
                    f"{len(arms.get(seed, []))} {label} runs)"
                    for group in (references, arms) for seed in group if seed not in seeds
                    for out_dir, _ in group[seed]]
        if left_out:
            notes.append(f"{label} vs {reference}, left out of the pairs: {', '.join(left_out)}")
        pairs = [(references[s][0][1], arms[s][0][1]) for s in seeds]
        if not pairs:
            continue
        if all("val_exact_match" in m for pair in pairs for m in pair):
            learned = sum(min(b["val_exact_match"], a["val_exact_match"]) >= learned_exact_match for b, a in pairs)
            informative = "yes" if learned == len(pairs) else f"no ({learned}/{len(pairs)} pairs)"
        elif not any(key.endswith("answer_ce") for pair in pairs for m in pair for key in m):  # text runs
            memorized = sum(b["val_ce_rise"] > 0 for b, _ in pairs)
            informative = "yes" if memorized == len(pairs) else f"no ({memorized}/{len(pairs)} memorized)"
        else:
            informative = "n/a"
        for key in [k for k in PAIRED_KEYS if all(k in m for pair in pairs for m in pair)]:
            changes = [a[key] - b[key] for b, a in pairs]
            relative = (mean_and_interval([100 * (a[key] / b[key] - 1) for b, a in pairs], "{:+.1f}%")
                        if all(b[key] for b, _ in pairs) else "n/a")  # n/a: a reference run at 0
            per_seed = ", ".join(f"{s}: {c:+.4f}" for s, c in zip(seeds, changes))
            lines.append(f"| {label} | {len(pairs)} | {informative} | {key} | {per_seed} | "
                         f"{mean_and_interval(changes, '{:+.4f}')} | {relative} |")
        bias, ce = "val_ood_length_bias", "val_ood_answer_ce"
        if len(pairs) >= 3 and all(bias in m and ce in m for pair in pairs for m in pair):
            # within seed: a pair's difference has no seed effect left, so this asks whether the runs
            # whose answers end earlier than their baseline's also pay more OOD answer CE
            r = np.corrcoef([a[bias] - b[bias] for b, a in pairs], [a[ce] - b[ce] for b, a in pairs])[0, 1]
            notes.append(f"{label} vs {reference}, within seed: the correlation over {len(pairs)} seeds of the change "
                         f"in {bias} with the change in {ce}: r = {r:+.2f}")
    return lines if len(lines) > 2 else [], notes


def summarize_runs(run_dirs, align_window=0, learned_exact_match=DEFAULTS["learned_exact_match"]):
    """Markdown tables of the runs' final evaluations, by mode: the summary metrics, the paired changes
    against the baseline, then the validation MBE of every block (the regularized middle ones and the
    free ones at both ends), then the alignment cosine over training if the runs measured it."""
    evaluated, pending = {}, []  # {row label: [(out_dir, rows, final metrics)]}
    runs = [(out_dir, *read_run(out_dir)) for out_dir in run_dirs]
    labels = setting_labels([(mode, rows) for _, mode, rows in runs])
    for (out_dir, _, rows), mode in zip(runs, labels):
        if not any(r.get("event") == "eval" for r in rows):
            pending.append(out_dir)  # a run still before its first evaluation: in the figure only
            continue
        evaluated.setdefault(mode, []).append((out_dir, rows, final_metrics(out_dir, rows)))
    if not evaluated:
        return f"no evaluation yet in {', '.join(pending)}: no table"
    metrics_by_mode = {mode: [metrics for _, _, metrics in rs] for mode, rs in evaluated.items()}
    rows_by_mode = {mode: [rows for _, rows, _ in rs] for mode, rs in evaluated.items()}
    runs = [m for ms in metrics_by_mode.values() for m in ms]
    keys = [k for k in SUMMARY_KEYS if all(k in m for m in runs)]
    iters = sorted({m["iter"] for m in runs})
    lines = [f"final evaluation at iter{'s' if len(iters) > 1 else ''} {', '.join(map(str, iters))}, mean ± std over "
             f"runs (change of the mean vs baseline's over the seeds both have); {SELECTED_KEYS_NOTE}", "", *mode_table(metrics_by_mode, keys)]
    reference = reference_row(evaluated)
    pairs, notes = paired_table(evaluated, reference, learned_exact_match) if reference else ([], [])
    if pairs:
        lines += ["", f"paired by seed: each run minus the {reference} run of its seed, the mean change and its 95% "
                      f"t-interval over seeds, also in % of the {reference} run; informative: on arithmetic, both runs of "
                      f"every pair reached val exact match >= {learned_exact_match} (n/a without eval_arithmetic.json); "
                      f"on text, every {reference} run memorized (val_ce_rise > 0)",
                  "", *pairs]
    if notes:
        lines += ["", *notes]
    for key, title in BLOCK_TABLES.items():
        n_blocks = min(sum(k.startswith(f"{key} ") for k in m) for m in runs)
        if n_blocks:
            lines += ["", title, "", *mode_table(metrics_by_mode, [f"{key} {b}" for b in range(n_blocks)],
                                                 [f"block {b}" for b in range(n_blocks)])]
    if pending:
        lines += ["", f"not in the tables, no evaluation yet: {', '.join(pending)}"]
    measured = {mode: rs for mode, rs in rows_by_mode.items() if all(any("align_cos" in r for r in rows) for rows in rs)}
    if measured:
        window = align_window or next(r["config"]["eval_interval"] for r in rows_by_mode[next(iter(measured))][0]
                                      if "config" in r)
        lines += ["", f"cos(grad CE, grad MBE_reg) per {window} steps: mean ± s.e. over the measurements "
                      f"(> 0 / all)", "", *alignment_table(measured, window)]
    return "\n".join(lines)


def check_figure_file(path):
    """A name matplotlib writes, where the folder that holds it (or the nearest one above it that
    exists, for folders still to be made) is writable."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if os.path.isdir(path):
        stop(f"--file={path} is a folder; name a file in it, {os.path.join(path, 'runs.png')} say")
    if os.path.splitext(path)[1][1:].lower() not in formats:
        stop(f"--file={path}: end the figure's name in a format matplotlib writes: .{', .'.join(formats)}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        stop(f"--file={path}: {existing} is a file, not a folder; choose another --file")
    if not os.access(existing, os.W_OK):
        stop(f"--file={path}: {existing} is not writable; choose another --file")


def run_report(cfg):
    run_dirs = [d for d in cfg.runs.split(",") if d]
    if not run_dirs:
        stop("--runs=DIR[,DIR...] is needed: the out_dirs of the runs to draw")
    seen = {}
    for run_dir in run_dirs:
        if os.path.realpath(run_dir) in seen:
            stop(f"--runs names the run {seen[os.path.realpath(run_dir)]} twice (as {run_dir} again); "
                 f"each run counts once: drop the repeat")
        seen[os.path.realpath(run_dir)] = run_dir
    forgetting = [d for d in run_dirs if os.path.exists(os.path.join(d, "forgetting.json"))]
    if forgetting and len(run_dirs) > 1:
        stop(f"{forgetting[0]} is a forgetting run (forgetting.json), drawn on its own: report it with "
             f"--runs={forgetting[0]} and the other runs in a command of their own")
    plt = import_pyplot()
    summary = None if forgetting else summarize_runs(run_dirs, cfg.align_window, cfg.learned_exact_match)
    file = cfg.file or os.path.join(run_dirs[0], "runs.png")
    check_figure_file(file)
    if forgetting:
        fig = plot_forgetting(os.path.join(forgetting[0], "forgetting.json"))
    else:
        fig = plot_training_runs(run_dirs)
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)  # only now: an error above leaves nothing behind
    fig.savefig(file, dpi=120)
    plt.close(fig)
    if summary:
        print(summary)
    print(f"wrote {file}")


if __name__ == "__main__":
    run_report(parse_config(sys.argv[1:], DEFAULTS, RULES))
