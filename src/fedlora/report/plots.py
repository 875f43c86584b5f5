"""PNG plots: per-client and mean metrics by round; a bar chart comparing methods."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def plot_rounds(rows: list[dict], folder: Path, title: str = "",
                metrics: tuple[str, ...] = ("accuracy", "macro_f1", "train_loss")) -> list[Path]:
    """One PNG per metric: a thin line per client, a thick mean line, the global test if any."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        clients = sorted({r["client"] for r in rows if isinstance(r["client"], int) and metric in r})
        by_round: dict[int, list[float]] = {}
        for cid in clients:
            pts = [(r["round"], r[metric]) for r in rows if r["client"] == cid and metric in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, alpha=0.4, linewidth=1, label=f"client {cid}")
                for x, y in pts:
                    by_round.setdefault(x, []).append(y)
        if by_round:
            xs = sorted(by_round)
            ax.plot(xs, [np.nanmean(by_round[x]) for x in xs], color="black", linewidth=2.5, label="client mean")
        glob = [(r["round"], r[metric]) for r in rows if r["client"] == "global" and metric in r]
        if glob:
            xs, ys = zip(*glob)
            ax.plot(xs, ys, color="tab:red", linestyle="--", linewidth=2, label="global test")
        if not by_round and not glob:
            plt.close(fig)
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" if title else metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        path = folder / f"{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_comparison(table: list[dict], path: Path, metric: str = "accuracy") -> Path:
    """Grouped bars per method: client mean (with std) and global test (with std over seeds)."""
    methods = [r["method"] for r in table]
    x = np.arange(len(methods))

    def pick(row, where):
        stats = (row[where] or {}).get(metric) if where == "global" else row["clients"][metric]
        if not stats or stats["count"] == 0 or math.isnan(stats["mean"]):
            return float("nan"), 0.0  # no bar (e.g. no global adapter)
        return stats["mean"], stats["std"]

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods)), 4.5))
    for offset, where, label in ((-0.2, "clients", "clients' own test (mean)"), (0.2, "global", "global test")):
        vals = [pick(r, where) for r in table]
        ax.bar(x + offset, [v[0] for v in vals], width=0.4, yerr=[v[1] for v in vals], capsize=3, label=label)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(f"final {metric} by method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
