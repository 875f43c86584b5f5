"""PNG plots: per-client and mean metrics by round; bars and by-round lines comparing methods.

What each plot does so that it can be read (each was a problem once):

- Every series has markers, so a series of one point (a global test scored only at the end, a
  run of one round) shows; a series with no finite value is not drawn and has no legend entry.
- Client lines are spread sideways by a small fixed offset per client (at most +-0.2 round) and
  carry their own marker, so clients with equal scores (common on small label-skewed test
  splits: 1.0, 0.5, ...) stay visible instead of hiding under one another; from 2 to 20 clients.
- Bounded metrics (accuracy, macro-F1, AUROC) keep the y axis at [0, 1], and whiskers are the
  standard deviation cut at that range: mean +- std of scores near 1.0 runs past 1.0, which no
  score can reach.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

BOUNDED = {"accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "auroc": (0.0, 1.0),
           "rougeL": (0.0, 1.0), "rouge1": (0.0, 1.0), "rouge2": (0.0, 1.0), "exact_match": (0.0, 1.0)}
"""Metrics with a fixed range: axes and whiskers stay inside it."""
_MARKERS = "osD^vP*Xh<>"


def _finite(value) -> float | None:
    """A plottable number, or None (NaN on a one-class split, null read back from JSON)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _series(rows: list[dict], who, metric: str) -> list[tuple[int, float]]:
    return sorted((r["round"], v) for r in rows if r["client"] == who and (v := _finite(r.get(metric))) is not None)


def _jitter(k: int, n: int) -> float:
    """Sideways offset of client k of n: evenly spread over [-0.2, 0.2] (none for one client)."""
    return 0.0 if n < 2 else -0.2 + 0.4 * k / (n - 1)


def _finish_axes(ax, metric: str) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric in BOUNDED:
        lo, hi = BOUNDED[metric]
        ax.set_ylim(lo - 0.03, hi + 0.03)
    ax.grid(alpha=0.3)


def plot_rounds(rows: list[dict], folder: Path, title: str = "",
                metrics: tuple[str, ...] = ("accuracy", "macro_f1", "train_loss")) -> list[Path]:
    """One PNG per metric: a marked, slightly offset line per client, the client mean (black) and
    the global test (red, dashed) where there is one."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        clients = sorted({r["client"] for r in rows if isinstance(r["client"], int)})
        lines = {cid: pts for cid in clients if (pts := _series(rows, cid, metric))}
        glob = _series(rows, "global", metric)
        if not lines and not glob:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        colours = plt.get_cmap("tab20" if len(clients) > 10 else "tab10")
        by_round: dict[int, list[float]] = {}
        for k, cid in enumerate(clients):
            if cid not in lines:
                continue
            xs, ys = zip(*lines[cid])
            ax.plot(np.asarray(xs) + _jitter(k, len(clients)), ys, color=colours(k % colours.N), alpha=0.75,
                    linewidth=1, marker=_MARKERS[k % len(_MARKERS)], markersize=4, label=f"client {cid}")
            for x, y in lines[cid]:
                by_round.setdefault(x, []).append(y)
        if by_round:
            xs = sorted(by_round)
            ax.plot(xs, [np.mean(by_round[x]) for x in xs], color="black", linewidth=2.5, marker="o",
                    markersize=6, label="client mean", zorder=5)
        if glob:
            xs, ys = zip(*glob)
            ax.plot(xs, ys, color="tab:red", linestyle="--", linewidth=2, marker="s", markersize=7,
                    label="global test", zorder=6)
        _finish_axes(ax, metric)
        ax.set_xlabel("round (0 = before training; client lines offset sideways to stay visible)")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" if title else metric)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2 if len(lines) > 12 else 1)
        path = folder / f"{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bar_stats(row: dict, where: str, metric: str) -> tuple[float, float, float]:
    """(mean, lower whisker, upper whisker): +- std cut at the metric's range; NaN mean = no bar."""
    stats = (row[where] or {}).get(metric) if where == "global" else row["clients"].get(metric)
    mean = _finite((stats or {}).get("mean"))
    if not stats or stats.get("count", 0) == 0 or mean is None:
        return float("nan"), 0.0, 0.0  # no bar (e.g. no global adapter)
    std = _finite(stats.get("std")) or 0.0
    lo, hi = BOUNDED.get(metric, (-math.inf, math.inf))
    return mean, min(std, mean - lo), min(std, hi - mean)


def plot_comparison(table: list[dict], path: Path, metric: str = "accuracy") -> Path:
    """Grouped bars per method: client mean and global test, whiskers +- std cut at the range."""
    methods = [r["method"] for r in table]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods)), 4.5))
    for offset, where, label in ((-0.2, "clients", "clients' own test (mean)"), (0.2, "global", "global test")):
        vals = [_bar_stats(r, where, metric) for r in table]
        ax.bar(x + offset, [v[0] for v in vals], width=0.4, yerr=[[v[1] for v in vals], [v[2] for v in vals]],
               capsize=3, label=label)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel(metric)
    lo, hi = BOUNDED.get(metric, (0.0, 1.0))
    ax.set_ylim(lo, hi + 0.03)  # room for a whisker's cap at 1.0
    ax.set_title(f"final {metric} by method (whiskers: ± std over clients/seeds, cut at [{lo:g}, {hi:g}])",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_methods_by_round(per_seed: list[dict[str, list[dict]]], run_dir: Path,
                          metrics: tuple[str, ...] = ("accuracy", "auroc")) -> list[Path]:
    """`comparison_rounds.png` (accuracy) and `comparison_rounds_<metric>.png` for the others: a line
    per method by round (client mean solid, global test dashed, mean over seeds; report/charts.py,
    the chart report.html shows), with the y axis at the metric's range."""
    from fedlora.report.charts import methods_by_round, save_png

    written = []
    for k, metric in enumerate(metrics):
        fig = methods_by_round(per_seed, metric)
        if fig is None:
            continue
        _finish_axes(fig.axes[0], metric)
        path = run_dir / ("comparison_rounds.png" if k == 0 else f"comparison_rounds_{metric}.png")
        save_png(fig, path)
        written.append(path)
    return written
