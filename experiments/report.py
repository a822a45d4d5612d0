"""
Figures and tables from what runs left in their out_dir: log.jsonl of gapt.py runs (and sample.py's
eval_arithmetic.json beside it), or forgetting.json of the toy. Everything can be redrawn from the
logs alone. matplotlib is needed here only.

    python -m experiments.report --runs=out-a,out-b --file=assets/runs.png   # figure + markdown tables
    python -m experiments.report --runs=out-forgetting --file=assets/forgetting.png
"""

import json
import math
import os
import sys

import numpy as np

from gapt import DEFAULTS as DEFAULTS_OF_GAPT, ConfigError, parse_config, read_log

DEFAULTS = dict(
    runs="",  # comma-separated out_dirs of the runs to draw (or one forgetting out_dir)
    file="runs.png",  # where the figure goes (default: not in assets/, which holds the committed figures)
    align_window=0,  # steps per column of the alignment-cosine table (0: the runs' eval_interval)
)


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("report: figures need matplotlib, which training does not: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def start_config(rows):
    return next(r["config"] for r in rows if r.get("event") == "start")


def read_run(out_dir):
    """(mode, rows) of a run: its mode from the start row, and every row of its log."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"report: no {path}; --runs takes the out_dirs of runs, comma-separated")
    rows = read_log(path)
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
LINE_STYLES = ("-", "--", ":", "-.")  # a mode's runs at different settings (lambda 1, 0.03, ...)


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


def plot_training_runs(run_dirs, png_path):
    """One panel per quantity the runs logged; GAPT's compression phases shaded in its color.
    A mode with several seeds is drawn as thin seed lines under a bold mean: with 5 seeds of 3 modes,
    15 lines of equal weight hide the comparison the figure is for."""
    plt = import_pyplot()
    runs = [read_run(d) for d in run_dirs]
    groups = line_groups(runs)
    panels = [(key, title) for key, title in PLOT_PANELS if any(key in r for _, rows in runs for r in rows)]
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
        for mode, rows in runs:  # the phases of several GAPT seeds overlap and shade darker
            if mode == "gapt":
                for first, last in compression_spans(rows, rows[-1]["iter"]):
                    ax.axvspan(first, last, color=MODE_COLORS[mode], alpha=0.08, lw=0)
        if key == "align_cos":
            ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(title, fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=3)
    if any(mode == "gapt" for mode, _ in runs):
        axes[0, 0].set_title("shaded: GAPT compression phases (darker where more seeds compress)", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def plot_forgetting(json_path, png_path):
    """Figure of the conflicting-memories toy from forgetting.json: separation per mode (mean and std
    over seeds, both schedules) and separation over training steps (mean over seeds)."""
    plt = import_pyplot()
    with open(json_path) as f:
        result = json.load(f)
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
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


SUMMARY_KEYS = ("val_ce", "min_val_ce", "val_mbe", "val_mbe_all", "val_answer_ce", "val_ood_answer_ce",
                "val_answer_ce_in_context", "val_ood_answer_ce_in_context", "val_exact_match", "val_ood_exact_match",
                "min_test_ood_answer_ce", "val_ood_answer_ce_at_min_test_ood", "compressing", "compression_phases")
SELECTED_KEYS_NOTE = ("min_*: the lowest over the run's evaluations, not the final one; *_at_min_test_ood: at the "
                      "evaluation with the lowest test_ood answer CE (early stopping on an OOD test split, the "
                      "author's leak, measured)")
BLOCK_TABLES = {  # per-block lists in the eval rows, and what each table shows
    "val_mbe_blocks": "validation MBE of each block's output",
    "val_mbe_centred_blocks": "validation MBE of each block's patches with their mean token removed",
    "val_top_share_blocks": "the largest eigenvalue's share of each block's patch Gram matrix",
    "val_mbe_alpha1_blocks": "validation alpha-1 (von Neumann) MBE of each block",
}


def final_metrics(out_dir, rows):
    """A run's last evaluation (at max_iters: a fixed step, never the best one, so nothing is
    chosen on a validation or OOD split), plus sample.py's exact match if eval_arithmetic.json exists,
    plus the selected values named by SELECTED_KEYS_NOTE, each labelled as such."""
    evals = [r for r in rows if r.get("event") == "eval"]
    last = evals[-1]
    metrics = dict(last, min_val_ce=min(r["val_ce"] for r in evals))
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
    for key in BLOCK_TABLES:
        for block, value in enumerate(last.get(key, [])):
            metrics[f"{key} {block}"] = value
    path = os.path.join(out_dir, "eval_arithmetic.json")
    if os.path.exists(path):
        with open(path) as f:
            metrics.update({f"{row['split']}_exact_match": row["exact_match"] for row in json.load(f)["rows"]})
    return metrics


def mode_table(by_mode, keys, headers=None):
    """Markdown rows: mean ± std of each key over each mode's runs, and the change of the mean
    against the first baseline row's (the plain "baseline" when there is one)."""
    means = {mode: {k: np.mean([m[k] for m in ms]) for k in keys} for mode, ms in by_mode.items()}
    reference = "baseline" if "baseline" in by_mode else next((m for m in by_mode if m.startswith("baseline")), None)
    lines = ["| mode | runs | " + " | ".join(headers or keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for mode, ms in by_mode.items():
        cells = []
        for k in keys:
            values = [m[k] for m in ms]
            cell = f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"
            if reference not in (None, mode) and means[reference][k]:
                cell += f" ({100 * (means[mode][k] / means[reference][k] - 1):+.1f}%)"
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
    protocols are never averaged together. A key a run's log lacks (an older gapt.py) has its default."""
    configs = [start_config(rows) for _, rows in runs]
    setting = lambda config, key: config.get(key, DEFAULTS_OF_GAPT.get(key))
    labels = []
    for (mode, _), config in zip(runs, configs):
        peers = [c for (m, _), c in zip(runs, configs) if m == mode]
        varying = [k for k in DEFAULTS_OF_GAPT if k not in SAME_PROTOCOL_KEYS
                   and len({repr(setting(c, k)) for c in peers}) > 1]
        labels.append(" ".join([mode] + [f"{KEY_NAMES.get(k, k)} {setting(config, k)}" for k in varying]))
    return labels


def summarize_runs(run_dirs, align_window=0):
    """Markdown tables of the runs' final evaluations, by mode: the summary metrics, then the
    validation MBE of every block (the regularized middle ones and the free ones at both ends),
    then the alignment cosine over training if the runs measured it."""
    metrics_by_mode, rows_by_mode, pending = {}, {}, []
    runs = [(out_dir, *read_run(out_dir)) for out_dir in run_dirs]
    labels = setting_labels([(mode, rows) for _, mode, rows in runs])
    for (out_dir, _, rows), mode in zip(runs, labels):
        if not any(r.get("event") == "eval" for r in rows):
            pending.append(out_dir)  # a run still before its first evaluation: in the figure only
            continue
        metrics_by_mode.setdefault(mode, []).append(final_metrics(out_dir, rows))
        rows_by_mode.setdefault(mode, []).append(rows)
    runs = [m for ms in metrics_by_mode.values() for m in ms]
    if not runs:
        return f"no evaluation yet in {', '.join(pending)}: no table"
    keys = [k for k in SUMMARY_KEYS if all(k in m for m in runs)]
    lines = [f"final evaluation at iter {sorted({m['iter'] for m in runs})}, mean ± std over runs "
             f"(change of the mean vs baseline); {SELECTED_KEYS_NOTE}", "", *mode_table(metrics_by_mode, keys)]
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


def run_report(cfg):
    run_dirs = [d for d in cfg.runs.split(",") if d]
    if not run_dirs:
        raise ConfigError("--runs=DIR[,DIR...] is needed: the out_dirs of the runs to draw")
    os.makedirs(os.path.dirname(cfg.file) or ".", exist_ok=True)
    forgetting_json = os.path.join(run_dirs[0], "forgetting.json")
    if os.path.exists(forgetting_json):
        plot_forgetting(forgetting_json, cfg.file)
    else:
        plot_training_runs(run_dirs, cfg.file)
        print(summarize_runs(run_dirs, cfg.align_window))
    print(f"wrote {cfg.file}")


if __name__ == "__main__":
    run_report(parse_config(sys.argv[1:], DEFAULTS))
