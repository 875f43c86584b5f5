"""One PNG of synthetic-table quality by round: a line per client for four key metrics.

Rows are table_quality dicts (one per client per round, as in quality.jsonl) with a "client"
and a "round" key added by the caller. A metric that is None (e.g. an empty synthetic table)
leaves a gap in that client's line rather than a crash.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# (key, axis label, ideal value drawn as a dashed line or None)
PANELS = (
    ("fidelity_mean", "column fidelity (mean 1-KS / 1-TV)", 1.0),
    ("ratio_accuracy", "TSTR / TRTR accuracy", 1.0),
    ("mia_auc", "membership-inference AUC", 0.5),
    ("dcr_median", "median DCR to train (dotted: holdout rows)", None),
)


def plot_quality(rows: list[dict], path: Path | str, title: str = "") -> Path:
    """Write a 2x2 grid (fidelity, TSTR/TRTR, MIA AUC, DCR median) by round to `path` (PNG).

    The DCR panel also shows, dotted, each client's dcr_real_median (holdout rows' distance to
    train), the distance a fresh real row would have.
    """
    bad = [r for r in rows if "client" not in r or "round" not in r]
    if bad:
        raise ValueError(f"plot_quality needs a 'client' and a 'round' in every row; "
                         f"{len(bad)} row(s) lack them, e.g. keys {sorted(bad[0])[:8]}")
    path = Path(path)
    clients = sorted({r["client"] for r in rows}, key=str)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, label, ideal) in zip(axes.flat, PANELS):
        for i, cid in enumerate(clients):
            mine = sorted((r for r in rows if r["client"] == cid), key=lambda r: r["round"])
            color = f"C{i % 10}"
            ax.plot([r["round"] for r in mine], [_value(r, key) for r in mine], marker="o",
                    markersize=3, color=color, label=f"client {cid}")
            if key == "dcr_median":
                ax.plot([r["round"] for r in mine], [_value(r, "dcr_real_median") for r in mine],
                        linestyle=":", color=color)
        if ideal is not None:
            ax.axhline(ideal, color="black", linestyle="--", linewidth=1, alpha=0.6)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("round")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 8))
    fig.suptitle(title or "synthetic table quality by round")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else float(value)
