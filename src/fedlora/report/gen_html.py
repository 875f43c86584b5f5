"""report.html's Scores section for a generation task: ROUGE / exact match / perplexity, and answers.

`report/html.py` hands over when comparison.json holds generation scores (`summary.generative`):
the table of GENERATIVE_COLUMNS for clients and global, ROUGE-L and exact match by round, the
comparison bar chart, and the first sample answers of each run's samples.jsonl, escaped.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.report import charts
from fedlora.report import html_parts as h
from fedlora.report.summary import GENERATIVE_COLUMNS

SHOWN_SAMPLES = 6
"""Sample answers per run on the page (samples.jsonl holds them all)."""
NOTE = ("Generation: greedy answers (eval.max_new_tokens), ROUGE F-measure (rouge-score, stemmed) and exact "
        "match after case and whitespace normalisation against the reference; ppl: perplexity of the "
        "references under the adapter (lower is better). clients: each client's own test split, mean ± std; "
        "global: the global test set. zero-shot is the untrained model.")


def _cut(text: str, width: int = 240) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _samples(run: Path, h, path: Path | None = None, name: str | None = None) -> str:
    """The first answers of `path` (default: the run's samples.jsonl), titled with `name`."""
    path = path or run / "samples.jsonl"
    if not path.is_file():
        return ""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:SHOWN_SAMPLES]:
        try:
            s = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        rows.append([h.esc(s.get("set", "")), h.esc(_cut(str(s.get("prompt", "")))),
                     h.esc(s.get("reference", "")), h.esc(s.get("generation", "")), h.fmt(s.get("rougeL"))])
    if not rows:
        return ""
    return (f"<details><summary>sample answers: {h.esc(name or run.name)}</summary>"
            + h.table(["set", "prompt", "reference", "generated", "ROUGE-L"], rows) + "</details>")


def generation_parts(run_dir: Path, table: list[dict], per_seed: list, subs: list[Path]) -> list[str]:
    """The Scores section's parts for a generation task."""
    rows = []
    for r in table:
        c, g = r["clients"], r.get("global") or {}
        rows.append([h.esc(r["method"]), h.esc(r.get("scored_with", "")),
                     *[h.stats(c.get(k)) for _, k in GENERATIVE_COLUMNS],
                     *[h.stats(g.get(k)) for _, k in GENERATIVE_COLUMNS], h.fmt(r.get("megabytes"), 2)])
    names = [name for name, _ in GENERATIVE_COLUMNS]
    parts = [h.table(["method", "scored with", *[f"client {n}" for n in names], *[f"global {n}" for n in names],
                       "MB sent"], rows), f'<p class="note">{h.esc(NOTE)}</p>']
    if per_seed:
        parts += [h.svg(charts.methods_by_round(per_seed, m), f"{m} by round, per method")
                  for m in ("rougeL", "exact_match")]
    parts.append(h.png(run_dir / "comparison.png", "final ROUGE-L by method"))
    # The untrained model's answers first (experiment.ZERO_SHOT_SAMPLES), then each run's.
    parts.append(_samples(run_dir, h, run_dir / "zero-shot-samples.jsonl", "zero-shot (untrained model)"))
    parts += [_samples(run, h) for run in subs]
    return parts
