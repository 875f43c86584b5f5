"""The HTML primitives of report.html (escaping, numbers, tables, figures), shared by report/html.py and
report/gen_html.py so that neither imports the other."""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path

from fedlora.report import charts


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return "-" if value is None else esc(value)


def stats(stats: dict | None) -> str:
    if not stats or not stats.get("count") or stats.get("mean") is None or stats["mean"] != stats["mean"]:
        return "-"
    spread = f" ± {stats['std']:.3f}" if stats["count"] > 1 else ""
    return f"{stats['mean']:.3f}{spread}"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{esc(caption)}</figcaption></figure>"


_chart_ids = itertools.count()


def reset_chart_ids() -> None:
    """Number charts from c0 again (report/html.build_report: the same run gives the same page)."""
    global _chart_ids
    _chart_ids = itertools.count()


def svg(fig, caption: str) -> str:
    return figure(charts.to_svg(fig, f"c{next(_chart_ids)}"), caption) if fig is not None else ""


def png(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return figure(f'<img alt="{esc(caption)}" src="data:image/png;base64,{data}">', caption)
