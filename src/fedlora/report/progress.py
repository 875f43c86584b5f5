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


def print_comparison(table: list[dict], note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedlora.report.summary import format_stats as cell

    out = Table(title="fedlora: final scores (higher is better)")
    for col in ("method", "client acc", "client F1", "client AUROC", "global acc", "global F1", "MB sent"):
        out.add_column(col, justify="left" if col == "method" else "right")
    for row in table:
        g = row["global"] or {}
        out.add_row(row["method"], cell(row["clients"]["accuracy"]), cell(row["clients"]["macro_f1"]),
                    cell(row["clients"]["auroc"]), cell(g.get("accuracy")), cell(g.get("macro_f1")),
                    f"{row['megabytes']:.2f}")
    console = Console()
    console.print(out)
    console.print(note, style="dim")
