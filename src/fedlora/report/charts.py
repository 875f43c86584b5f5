"""Inline SVG charts for report.html, drawn from the metric rows a run already wrote.

Each function takes `per_seed` (a list, one per seed, of {label: metric rows}, as in `rows.json`)
and returns a matplotlib figure, or None when the rows hold nothing to draw (no chart is better than
an empty frame). `to_svg` turns a figure into an inline <svg> element and closes it; `save_png`
writes it as a file (the same chart for a report and for a folder of PNGs).
"""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

PerSeed = list[dict[str, list[dict]]]
_MARKERS = "osD^vP*Xh<>"


def to_svg(fig, prefix: str = "chart") -> str:
    """The figure as an inline <svg> element (no XML prolog), then closed.

    Text stays text (svg.fonttype none: the page's fonts, a quarter of the size), and every id is
    prefixed, so several charts in one page never share an id (matplotlib names its markers by a
    hash of their shape, the same in every figure).
    """
    buf = io.StringIO()
    fig.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fedlora"}):  # salt: same ids each build
        fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)  # drops its date
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', text)
    return re.sub(r'(href="#|url\(#)([^")]+)', rf"\1{prefix}-\2", text)


def save_png(fig, path) -> None:
    """The figure as a PNG file, then closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _labels(per_seed: PerSeed) -> list[str]:
    return list(per_seed[0]) if per_seed else []


def _colours(per_seed: PerSeed) -> dict[str, str]:
    return {label: _colour(per_seed, label) for label in _labels(per_seed)}


def _colour(per_seed: PerSeed, label: str) -> str:
    """One colour per label across every chart of a page."""
    labels = _labels(per_seed)
    return f"C{labels.index(label) % 10}" if label in labels else "grey"


def _trained(per_seed: PerSeed) -> list[str]:
    """Labels with rounds after 0 (methods, not zero-shot or baseline references)."""
    return [m for m in _labels(per_seed) if any(r.get("round", 0) > 0 for s in per_seed for r in s.get(m, []))]


def _by_round(per_seed: PerSeed, label: str, metric: str, where: str) -> dict[int, list[float]]:
    """Values of `metric` by round for one label, pooled over seeds (and clients, for 'clients')."""
    out: dict[int, list[float]] = {}
    for seed_rows in per_seed:
        for row in seed_rows.get(label, []):
            is_client = isinstance(row.get("client"), int)
            if (where == "clients") != is_client or (where == "global" and row.get("client") != "global"):
                continue
            value = _number(row.get(metric))
            if value is not None:
                out.setdefault(int(row["round"]), []).append(value)
    return out


def methods_by_round(per_seed: PerSeed, metric: str = "accuracy") -> plt.Figure | None:
    """One line per method: client mean by round (solid) and global test (dashed, same colour);
    the references (zero-shot, baseline) as dotted horizontal lines. Markers on every point, so a
    single round still shows and methods that coincide stay visible."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for k, label in enumerate(_trained(per_seed)):
        colour, marker = _colour(per_seed, label), _MARKERS[k % len(_MARKERS)]
        for where, style, suffix in (("clients", "-", "clients' own test"), ("global", "--", "global test")):
            series = _by_round(per_seed, label, metric, where)
            start = _by_round(per_seed, "zero-shot", metric, where).get(0)
            if series and start and 0 not in series:  # every method starts from the untrained model
                series[0] = start
            if series:
                xs = sorted(series)
                ax.plot(xs, [np.mean(series[x]) for x in xs], linestyle=style, marker=marker, color=colour,
                        markersize=5, label=f"{label} ({suffix})")
                drawn = True
    for k, label in enumerate(m for m in _labels(per_seed) if m not in _trained(per_seed)):
        where = "global" if _by_round(per_seed, label, metric, "global") else "clients"
        series = _by_round(per_seed, label, metric, where)
        if series and label != "zero-shot":  # zero-shot is every method's round 0
            ax.axhline(np.mean([v for vs in series.values() for v in vs]), color="grey",
                       linestyle=(0, (1, 2 + 2 * k)), linewidth=1.2,
                       label=f"{label} ({'global test' if where == 'global' else 'clients mean'})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by round (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def client_spread(per_seed: PerSeed, metric: str = "accuracy") -> plt.Figure | None:
    """Each client's final score on its own test split, one dot per (client, seed), per method, with
    the median as a bar: the spread a mean ± std hides (and never past the metric's range)."""
    columns = []
    for label in _labels(per_seed):
        values = []
        for seed_rows in per_seed:
            rows = seed_rows.get(label, [])
            last = max((r["round"] for r in rows if isinstance(r.get("client"), int) and metric in r), default=None)
            values += [v for r in rows if isinstance(r.get("client"), int) and r["round"] == last
                       and (v := _number(r.get(metric))) is not None]
        if values:
            columns.append((label, values))
    if not columns:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(columns)), 3.6))
    rng = np.random.default_rng(0)  # fixed jitter: the same report for the same rows
    for k, (label, values) in enumerate(columns):
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=18, alpha=0.7,
                   color=_colour(per_seed, label))
        ax.hlines(np.median(values), k - 0.3, k + 0.3, color="black", linewidth=2)
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], rotation=20, ha="right")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"per-client final {metric} (dots: client x seed; bar: median)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _server_series(per_seed: PerSeed, key) -> dict[str, dict[int, list[float]]]:
    """{label: {round: values over seeds}} of a server-row quantity (key: a row -> number or None)."""
    out: dict[str, dict[int, list[float]]] = {}
    for seed_rows in per_seed:
        for label, rows in seed_rows.items():
            for row in rows:
                if row.get("client") == "server" and (value := key(row)) is not None:
                    out.setdefault(label, {}).setdefault(int(row["round"]), []).append(value)
    return out


def _line_chart(series: dict[str, dict[int, list[float]]], ylabel: str, title: str, colours: dict[str, str],
                cumulative: bool = False) -> plt.Figure | None:
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, (label, by_round) in enumerate(series.items()):
        xs = sorted(by_round)
        ys = np.array([np.mean(by_round[x]) for x in xs])
        ax.plot(xs, np.cumsum(ys) if cumulative else ys, marker=_MARKERS[k % len(_MARKERS)],
                color=colours.get(label, f"C{k % 10}"), markersize=5, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def bytes_by_round(per_seed: PerSeed) -> plt.Figure | None:
    """Cumulative megabytes sent (up + down) by round, per method (mean over seeds)."""
    def megabytes(row):
        total = (row.get("bytes_up") or 0) + (row.get("bytes_down") or 0)
        return total / 1e6 if total else None
    return _line_chart(_server_series(per_seed, megabytes), "MB sent (cumulative)",
                       "communication: cumulative MB up + down", _colours(per_seed), cumulative=True)


def epsilon_by_round(per_seed: PerSeed) -> plt.Figure | None:
    """The DP epsilon spent by the end of each round, per method (only runs with dp on)."""
    return _line_chart(_server_series(per_seed, lambda row: _number(row.get("epsilon"))), "epsilon",
                       "differential privacy: epsilon spent by round", _colours(per_seed))
