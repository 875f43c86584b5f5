"""Progress bars for rounds and a one-line summary per round; a readable final table."""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm


def _mean(values):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def round_line(method: str, round_index: int, rows: list[dict]) -> str:
    clients = [r for r in rows if isinstance(r.get("client"), int)]
    glob = [r for r in rows if r.get("client") == "global"]
    server = next((r for r in rows if r.get("client") == "server"), {})
    parts = [f"[{method}] round {round_index}"]
    losses = [r["train_loss"] for r in clients if "train_loss" in r]
    if losses:
        parts.append(f"loss {_mean(losses):.3f}")
    accs = [r["accuracy"] for r in clients if "accuracy" in r]
    if accs:
        parts.append(f"client acc {_mean(accs):.3f}")
    if glob:
        parts.append(f"global acc {glob[0]['accuracy']:.3f}")
    kb = (server.get("bytes_up", 0) + server.get("bytes_down", 0)) / 1e3
    parts.append(f"{kb:.0f} kB sent")
    seconds = sum(v for k, v in server.items() if k.startswith("time_"))
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


class RoundProgress:
    def __init__(self, method: str, rounds: int, quiet: bool = False):
        self.method, self.quiet = method, quiet
        self.bar = None if quiet else tqdm(total=rounds, desc=method, unit="round", leave=False)

    def update(self, round_index: int, rows: list[dict]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        tqdm.write(round_line(self.method, round_index, rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(stats: dict | None) -> str:
    """'0.66±0.18' (no spread shown for a single value), or '-' when undefined."""
    if not stats or stats["count"] == 0 or math.isnan(stats["mean"]):
        return "-"
    return f"{stats['mean']:.2f}" + (f"±{stats['std']:.2f}" if stats["count"] > 1 else "")


def print_comparison(table: list[dict], note: str) -> None:
    """The final table for a terminal: accuracy and AUROC, clients' own tests and global test.

    Macro-F1 and three decimals are in comparison.md; this view fits 80 columns.
    """
    from rich.console import Console
    from rich.table import Table

    out = Table(title="fedlora: final scores (higher is better)")
    out.add_column("method", no_wrap=True)
    for col in ("clients\nacc", "clients\nAUROC", "global\nacc", "global\nAUROC", "MB\nsent"):
        out.add_column(col, justify="right", no_wrap=True)
    for row in table:
        g = row["global"] or {}
        label = row["method"] + (" (own)" if row.get("scored_with") == "personal" else "")
        out.add_row(label, _short(row["clients"]["accuracy"]), _short(row["clients"]["auroc"]),
                    _short(g.get("accuracy")), _short(g.get("auroc")), f"{row['megabytes']:.1f}")
    console = Console()
    console.print(out)
    console.print(note + " (own): a personalized method, scored with each client's own adapter.",
                  style="dim")
