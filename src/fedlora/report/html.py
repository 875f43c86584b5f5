"""report.html: one self-contained page per run directory, rebuilt from the files the run wrote.

`write_report(run_dir)` reads only what is on disk (config.yaml, partition.json, rows.json,
comparison.json, each sub-run's summary.json and PNGs, sweep.jsonl/sweep.md, concordia.md,
client_tree.json, quality.png), so `fedlora report RUN_DIR` rebuilds the page of any finished run,
and a run killed half way still gets a page of what it finished. Charts are inline SVG or PNG as
data URIs; the page loads nothing from the network and runs no script.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedlora.report import charts, html_parts
from fedlora.report.html_parts import esc as _esc, fmt as _fmt, png as _png, stats as _stats, svg as _svg, table as _table
from fedlora.report.summary import CALIBRATED_COLUMNS, METRICS, calibrated, generative

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:.85rem;max-width:60rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}figure svg,figure img{max-width:100%;
height:auto}figcaption{font-size:.8rem;color:#555}pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;
font-size:.8rem}details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
"""

SCORING_NOTE = (
    "clients: each client's final score on its own test split, mean ± std over clients (and seeds), "
    "with the method's global adapter or, for personalized methods (scored with 'personal'), the "
    "client's own adapter. global: the final global adapter on the held-out global test set (± std over "
    "seeds); personalized methods have none; decentralized methods (dec_*, tad_lora) score each "
    "client's own adapter on the global test. Every LLM row predicts the label whose verbalized text "
    "has the highest likelihood; AUROC uses the softmax over the label likelihoods. zero-shot is the "
    "base model before training; baseline-* is a classical model on the same client splits."
)
CALIBRATION_NOTE = (
    "cal: the same scores after the eval.calibration fit (contextual: content-free prompts; bias: "
    "inverse temperature and per-class bias), fitted on each client's own validation split and, for "
    "the global test, as eval.global_calibration says; never on a test split. Binary AUROC is "
    "unchanged by it. ECE: expected calibration error of the top-label confidence, 10 bins; the "
    "baseline keeps its own decision rule (docs/calibration.md)."
)


def _read_json(path: Path):
    """A JSON file fedlora wrote (older runs may hold bare NaN, which Python's parser accepts)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def markdown_to_html(text: str) -> str:
    """The small Markdown fedlora writes (headings, pipe tables, paragraphs, **bold**) as HTML."""
    out, table = [], []

    def inline(s: str) -> str:
        parts = _esc(s).split("**")
        return "".join(f"<b>{p}</b>" if k % 2 else p for k, p in enumerate(parts))

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
            body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(_table(cells[0], [[inline(c) for c in r] for r in body]))
            table.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 5)  # the page's own h1/h2 stay on top
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f'<p class="note">{inline(line)}</p>')
    flush()
    return "\n".join(out)


def _per_seed(run_dir: Path) -> list[dict[str, list[dict]]]:
    """rows.json (every label, per seed), or a lone metrics.jsonl (a Flower run) as one seed."""
    per_seed = _read_json(run_dir / "rows.json")
    if per_seed:
        return per_seed
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash: the page shows what was finished
            continue
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(str(row.get("method", "run")), []).append(row)
    return [by_method] if by_method else []


def _sub_runs(run_dir: Path) -> list[Path]:
    """The directories holding one method's run: the run itself, or each `<label>-seed<k>/`."""
    if (run_dir / "summary.json").is_file():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "summary.json").is_file())


def _scores_section(run_dir: Path, per_seed: list) -> str:
    table = _read_json(run_dir / "comparison.json")
    if table and generative(table):  # ROUGE, exact match and sample answers (report/gen_html.py)
        from fedlora.report.gen_html import generation_parts

        return _section("Scores", generation_parts(run_dir, table, per_seed, _sub_runs(run_dir)))
    parts = []
    if table:
        extra = CALIBRATED_COLUMNS if calibrated(table) else ()  # eval.calibration on
        keys = (*METRICS, *(k for _, k in extra))
        rows = []
        for r in table:
            c, g = r["clients"], r.get("global") or {}
            rows.append([_esc(r["method"]), _esc(r.get("scored_with", "")), *[_stats(c.get(k)) for k in keys],
                         *[_stats(g.get(k)) for k in keys], _fmt(r.get("megabytes"), 2)])
        labels = ("acc", "macro-F1", "AUROC", *(name for name, _ in extra))
        parts.append(_table(["method", "scored with", *[f"client {x}" for x in labels],
                             *[f"global {x}" for x in labels], "MB sent"], rows))
        parts.append(f'<p class="note">{_esc(SCORING_NOTE)}</p>')
        if extra:
            parts.append(f'<p class="note">{_esc(CALIBRATION_NOTE)}</p>')
    if per_seed:
        parts += [_svg(charts.methods_by_round(per_seed, m), f"{m} by round, per method") for m in ("accuracy", "auroc")]
        parts.append(_svg(charts.client_spread(per_seed), "per-client spread of the final accuracy"))
    parts.append(_png(run_dir / "comparison.png", "final accuracy by method"))
    return _section("Scores", parts)


def _section(title: str, parts: list[str]) -> str:
    body = "\n".join(p for p in parts if p)
    return f'<section><h2>{_esc(title)}</h2>\n{body}\n</section>' if body else ""


def _communication_section(per_seed: list) -> str:
    return _section("Communication", [_svg(charts.bytes_by_round(per_seed), "cumulative MB sent by round")])


def _privacy_section(subs: list[Path], per_seed: list) -> str:
    rows = []
    for sub in subs:
        dp = (_read_json(sub / "summary.json") or {}).get("dp")
        if dp:
            rows.append([_esc(sub.name), _fmt(dp.get("epsilon")), _fmt(dp.get("delta"), 6), _esc(dp.get("accountant")),
                         _esc(dp.get("sampling")), _fmt(dp.get("noise_multiplier")), _esc(dp.get("adjacency"))])
    if not rows:
        return ""
    table = _table(["run", "epsilon", "delta", "accountant", "sampling", "noise multiplier", "adjacency"], rows)
    return _section("Differential privacy", [table, _svg(charts.epsilon_by_round(per_seed), "epsilon by round")])


def _tree_section(subs: list[Path]) -> str:
    parts = []
    for sub in subs:
        tree = _read_json(sub / "client_tree.json")
        if not tree:
            continue
        rows = [[_esc(layer), _esc("; ".join("{" + ", ".join(members) + "}" for members in clusters.values()))]
                for layer, clusters in zip(tree.get("layers", []), tree.get("clusters", []))]
        parts.append(f"<h3>{_esc(sub.name)}</h3>" + _table(["layer", "clusters (cut of the client tree)"], rows))
        parts.append(_png(sub / "client_tree.png", f"{sub.name}: client tree and cuts"))
    return _section("FedTreeLoRA client tree", parts)


def _markdown_file_section(run_dir: Path, name: str, title: str, pngs: list[tuple[Path, str]]) -> str:
    path = run_dir / name
    if not path.is_file():
        return ""
    return _section(title, [markdown_to_html(path.read_text(encoding="utf-8"))] + [_png(p, c) for p, c in pngs])


def _runs_section(subs: list[Path]) -> str:
    parts = []
    for sub in subs:
        summary = _read_json(sub / "summary.json") or {}
        facts = (f"rounds {summary.get('rounds', '-')}, {summary.get('scored_on', '')}, "
                 f"{(summary.get('bytes_up', 0) + summary.get('bytes_down', 0)) / 1e6:.2f} MB sent, "
                 f"{summary.get('wall_seconds', '-')} s")
        figures = "".join(_png(p, f"{sub.name}: {p.stem}") for p in sorted((sub / "plots").glob("*.png")))
        parts.append(f"<details><summary>{_esc(sub.name)}</summary><p class='note'>{_esc(facts)}</p>"
                     f"{figures}</details>")
    return _section("Each run", parts)


def _data_section(run_dir: Path) -> str:
    clients = _read_json(run_dir / "partition.json")
    if not clients:
        return ""
    classes = sorted({c for row in clients for c in row.get("train_classes", {})})
    rows = [[_esc(r["client"]), r["train"], r["val"], r["test"]] + [r["train_classes"].get(c, 0) for c in classes]
            for r in clients]
    return _section("Data and partition", [_table(["client", "train", "val", "test"] + [f"train {c}" for c in classes],
                                                  rows)])


def _kind(run_dir: Path) -> str:
    if (run_dir / "sweep.json").is_file():
        return "robustness sweep"
    if (run_dir / "concordia.md").is_file():
        return "Concordia comparison"
    if (run_dir / "summary.json").is_file():
        return "run"
    return "comparison"


def build_report(run_dir: str | Path) -> str:
    """The page's HTML for a run directory (see the module docstring for what it reads)."""
    from fedlora.version import __version__

    html_parts.reset_chart_ids()  # ids from c0 on every build: the same run gives the same page
    run_dir = Path(run_dir)
    per_seed = _per_seed(run_dir)
    subs = _sub_runs(run_dir)
    config = run_dir / "config.yaml"
    config_text = config.read_text(encoding="utf-8") if config.is_file() else "(no config.yaml)"
    sections = [
        _scores_section(run_dir, per_seed),
        _markdown_file_section(run_dir, "sweep.md", "Robustness", [(run_dir / "heatmap.png", "robustness heat map")]),
        _markdown_file_section(run_dir, "concordia.md", "Concordia: synthetic tables",
                               [(sub / "quality.png", f"{sub.name}: synthetic-table quality by round") for sub in subs]),
        _communication_section(per_seed),
        _privacy_section(subs, per_seed),
        _tree_section(subs),
        _runs_section(subs),
        _data_section(run_dir),
        _section("Config", [f"<details><summary>config.yaml (resolved)</summary><pre>{_esc(config_text)}</pre>"
                            "</details>"]),
    ]
    meta = f"{_kind(run_dir)} · fedlora {__version__} · page built {time.strftime('%Y-%m-%d %H:%M')}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fedlora report: {_esc(run_dir.name)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>fedlora report: {_esc(run_dir.name)}</h1><p class='meta'>{_esc(meta)}</p>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (via a temporary file, so a crash never leaves half a page)."""
    run_dir = Path(run_dir)
    known = ("config.yaml", "metrics.jsonl", "rows.json", "sweep.jsonl")
    if not run_dir.is_dir() or not any((run_dir / name).is_file() for name in known):
        raise ValueError(f"{run_dir} is not a run directory (it holds none of {', '.join(known)}); pass a "
                         "directory written by fedlora run, compare, robustness, concordia or flower local")
    page = build_report(run_dir)
    path = run_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
