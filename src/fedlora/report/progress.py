"""Round progress: a rich bar on a terminal, one plain line per round anywhere else.

On a terminal (stderr is a tty and not TERM=dumb) a single rich `Progress` shows the rounds and,
as a second row of the same display, the current client's local steps; each round's summary
line is printed above it and stays, and the bars vanish when the method ends (`transient`), so
nothing is left but the lines. Anywhere else (a pipe, a log file, CI, a notebook) there is no bar
at all: exactly one line per round, written and flushed as the round ends, with no carriage
returns or escape codes to clean out of a log. Both go to stderr, like logging: stdout keeps the
tables and the `results:` line a script may read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


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
    rouge = [r["rougeL"] for r in clients if "rougeL" in r]  # a generation task
    if rouge:
        parts.append(f"client ROUGE-L {_mean(rouge):.3f}")
    if glob and "accuracy" in glob[0]:
        parts.append(f"global acc {glob[0]['accuracy']:.3f}")
    elif glob and "rougeL" in glob[0]:
        parts.append(f"global ROUGE-L {glob[0]['rougeL']:.3f}")
    kb = (server.get("bytes_up", 0) + server.get("bytes_down", 0)) / 1e3
    parts.append(f"{kb:.0f} kB sent")
    seconds = sum(v for k, v in server.items() if k.startswith("time_"))
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


def is_terminal(console: Console) -> bool:
    """Whether live bars belong on `console`: a real terminal that can move the cursor."""
    return console.is_terminal and not console.is_dumb_terminal


_LIVE: list[RoundProgress] = []
"""The progress on screen now, if any: `track_steps` adds the step row to it rather than drawing a
second, nested bar (the training loop sits several calls below the run and has no handle on it)."""


class RoundProgress:
    """Progress over `rounds` rounds of `method`; `update` once per finished round, then `close`.

    `console` defaults to stderr; tests pass one writing to a buffer, with force_terminal to get bars.
    """

    def __init__(self, method: str, rounds: int, quiet: bool = False, console: Console | None = None):
        self.method, self.quiet = method, quiet
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._steps: TaskID | None = None
        if not quiet and is_terminal(self.console):
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
            self._rounds = self._bar.add_task(method, total=rounds, unit="rounds")
            self._bar.start()
            _LIVE.append(self)

    def update(self, round_index: int, rows: list[dict]) -> None:
        if self.quiet:
            return
        line = round_line(self.method, round_index, rows)
        if self._bar is None:
            self.console.file.write(line + "\n")
            self.console.file.flush()
            return
        self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._bar.advance(self._rounds)

    def track(self, items: Iterable, label: str) -> Iterator:
        """`items`, advancing the step row (labelled `label`) of this display as each is taken."""
        items = list(items)
        if self._bar is None:
            yield from items
            return
        if self._steps is None:
            self._steps = self._bar.add_task(label, total=len(items), unit="steps")
        self._bar.reset(self._steps, total=len(items), description=label, visible=True)
        for item in items:
            yield item
            self._bar.advance(self._steps)
        self._bar.update(self._steps, visible=False)

    def close(self) -> None:
        """Remove the bars (the round lines stay); safe to call twice, and after an error."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self in _LIVE:
            _LIVE.remove(self)


def track_steps(items: Iterable, label: str | None) -> Iterable:
    """`items` unchanged, or counted on the step row of the progress on screen (never a new bar)."""
    if not label or not _LIVE:
        return items
    return _LIVE[-1].track(items, label)


def _short(stats: dict | None) -> str:
    """'0.66±0.18' (no spread shown for a single value), or '-' when undefined."""
    if not stats or stats["count"] == 0 or math.isnan(stats["mean"]):
        return "-"
    return f"{stats['mean']:.2f}" + (f"±{stats['std']:.2f}" if stats["count"] > 1 else "")


def _accuracy(stats: dict, cal: bool) -> str:
    """Accuracy as `_short` shows it, or with calibration on 'raw→calibrated' means ('-' if undefined)."""
    if not cal:
        return _short(stats.get("accuracy"))

    def mean(s: dict | None) -> str:
        return "-" if not s or s["count"] == 0 or math.isnan(s["mean"]) else f"{s['mean']:.2f}"

    return f"{mean(stats.get('accuracy'))}→{mean(stats.get('accuracy_cal'))}" if stats else "-"


def print_comparison(table: list[dict], note: str) -> None:
    """The final table for a terminal: accuracy and AUROC, clients' own tests and global test.

    Macro-F1 and three decimals are in comparison.md; this view fits 80 columns.
    """
    from rich.console import Console
    from rich.table import Table

    from fedlora.report.columns import calibrated, generative

    if generative(table):
        return _print_generative(table, note)
    cal = calibrated(table)  # eval.calibration: accuracy as 'raw→calibrated' means, same width
    acc = "acc→cal" if cal else "acc"
    out = Table(title="fedlora: final scores (higher is better)")
    out.add_column("method", no_wrap=True)
    for col in (f"clients\n{acc}", "clients\nAUROC", f"global\n{acc}", "global\nAUROC", "MB\nsent"):
        out.add_column(col, justify="right", no_wrap=True)
    for row in table:
        c, g = row["clients"], row["global"] or {}
        label = row["method"] + (" (own)" if row.get("scored_with") == "personal" else "")
        out.add_row(label, _accuracy(c, cal), _short(c["auroc"]), _accuracy(g, cal), _short(g.get("auroc")),
                    f"{row['megabytes']:.1f}")
    console = Console()
    console.print(out)
    console.print(note + " (own): a personalized method, scored with each client's own adapter.",
                  style="dim")


def _print_generative(table: list[dict], note: str) -> None:
    """print_comparison for a generation task: ROUGE-L and exact match, clients and global test."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title="fedlora: final scores (higher is better)")
    out.add_column("method", no_wrap=True)
    for col in ("clients\nROUGE-L", "clients\nEM", "global\nROUGE-L", "global\nEM", "MB\nsent"):
        out.add_column(col, justify="right", no_wrap=True)
    for row in table:
        c, g = row["clients"], row["global"] or {}
        label = row["method"] + (" (own)" if row.get("scored_with") == "personal" else "")
        out.add_row(label, _short(c.get("rougeL")), _short(c.get("exact_match")), _short(g.get("rougeL")),
                    _short(g.get("exact_match")), f"{row['megabytes']:.1f}")
    console = Console()
    console.print(out)
    console.print(note + " (own): a personalized method, scored with each client's own adapter.", style="dim")
