"""Summaries of metric rows: per method, and a comparison table across methods and seeds.

Client-level numbers are each client's final-round score on its own test split; we report the
mean and standard deviation across clients (and seeds). Global numbers are the final score on
the global test set (mean and std across seeds); personalized methods have none.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedlora.jsonio import write_json
from fedlora.report.columns import (  # noqa: F401  (re-exported)
    CALIBRATED_COLUMNS,
    GENERATIVE_COLUMNS,
    calibrated,
    generative,
)
from fedlora.report.tasks import per_seed_tasks, task_rows, tasks_of

METRICS = ("accuracy", "macro_f1", "auroc")
CALIBRATED = ("ece", "accuracy_cal", "macro_f1_cal", "auroc_cal", "ece_cal", "accuracy_contextual",
              "macro_f1_contextual", "accuracy_bias", "macro_f1_bias")
"""Reported beside METRICS where rows carry them (fl/scoring.py): the raw expected calibration error
of every LLM row, and with eval.calibration the calibrated scores ('both' adds its two parts)."""
GENERATIVE = ("rougeL", "rouge1", "rouge2", "exact_match", "perplexity")
"""What rows of a generation task carry instead of METRICS (train/gen_eval.py)."""


def is_generative(rows: dict | list[dict], prefix: str = "") -> bool:
    """Whether `rows` are scores of a generation task (they carry ROUGE-L, not accuracy)."""
    rows = [rows] if isinstance(rows, dict) else rows
    return any(prefix + "rougeL" in r for r in rows)


def reported(rows: dict | list[dict], prefix: str = "") -> tuple[str, ...]:
    """METRICS, then the CALIBRATED names that a row (or any of `rows`) carries as `prefix + name`."""
    rows = [rows] if isinstance(rows, dict) else rows
    gen = GENERATIVE if is_generative(rows, prefix) else ()
    if gen and not any(prefix + "accuracy" in r for r in rows):
        return GENERATIVE
    # several sources may mix tables and generation records: both kinds of metrics, then
    return METRICS + tuple(m for m in CALIBRATED if any(prefix + m in r for r in rows)) + gen


def final_rows(rows: list[dict]) -> list[dict]:
    """The evaluated rows of the last evaluated round."""
    scored = [r for r in rows if "accuracy" in r or "rougeL" in r]
    if not scored:
        return []
    last = max(r["round"] for r in scored)
    return [r for r in scored if r["round"] == last]


def _stats(values: list[float]) -> dict[str, float]:
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(vals) == 0:
        return {"mean": float("nan"), "std": float("nan"), "count": 0}
    return {"mean": float(vals.mean()), "std": float(vals.std()), "count": int(len(vals))}


def summarize(rows: list[dict], method: str, personalized: bool) -> dict:
    """One method's summary from its metric rows (one seed)."""
    final = final_rows(rows)
    clients = [r for r in final if isinstance(r["client"], int)]
    glob = [r for r in final if r["client"] == "global"]
    server = [r for r in rows if r["client"] == "server"]
    summary = {
        "method": method,
        "scored_on": "each client's own adapter" if personalized else "one global adapter",
        "rounds": max((r["round"] for r in rows), default=0),
        "clients": {m: _stats([r.get(m) for r in clients]) for m in reported(clients)},
        "global": {m: glob[0][m] for m in reported(glob[0])} if glob else None,
        "bytes_up": int(sum(r.get("bytes_up", 0) for r in server)),
        "bytes_down": int(sum(r.get("bytes_down", 0) for r in server)),
    }
    summary.update(_gossip_summary(clients, server))
    tasks = tasks_of(final)
    if tasks:  # several sources: each task's own summary, and client metrics of every task kind
        summary["tasks"] = {t: {k: v for k, v in summarize(task_rows(rows, t), method, personalized).items()
                                if k in ("clients", "global")} for t in tasks}
        names = dict.fromkeys(m for t in summary["tasks"].values() for m in t["clients"])
        summary["clients"] = {m: _stats([r.get(m) for r in clients]) for m in names}
    return summary


def _gossip_summary(clients: list[dict], server: list[dict]) -> dict:
    """Decentralized runs (fl/gossip.py): each client's adapter on the global test (mean and spread
    over clients), rho, rounds whose graph was disconnected, and the final consensus distances."""
    if not server or "connected" not in server[-1]:
        return {}
    last = server[-1]
    return {
        "clients_on_global_test": {m: _stats([r.get(f"global_{m}") for r in clients])
                                   for m in reported(clients, "global_")},
        "rho": last["rho"],
        "disconnected_rounds": sum(1 for r in server if not r["connected"]),
        **{k: v for k, v in last.items() if k.startswith("consensus_")},
    }


def _scored_with(method: str) -> str:
    """'personal' (each client's own adapter), 'global' (one adapter), or 'reference'."""
    from fedlora.fl.methods import available_methods, method_class

    method = method.rsplit(":", 1)[-1]  # 'static:fedit': a Concordia variant over fedit
    if method not in available_methods():
        return "reference"
    return "personal" if method_class(method).personalized else "global"


def comparison(per_seed: list[dict[str, list[dict]]]) -> list[dict]:
    """One row per method: client metrics pooled over (client, seed), global over seeds."""
    methods = list(per_seed[0])
    table = []
    for m in methods:
        finals = [final_rows(seed_rows[m]) for seed_rows in per_seed]
        clients = [r for f in finals for r in f if isinstance(r["client"], int)]
        glob = [r for f in finals for r in f if r["client"] == "global"]
        on_global = [r for r in clients if "global_accuracy" in r]  # gossip: every client's own adapter
        traffic = [sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in seed_rows[m]
                       if r["client"] == "server") for seed_rows in per_seed]
        table.append({
            "method": m,
            "scored_with": _scored_with(m),
            "seeds": len(per_seed),
            "clients": {k: _stats([r.get(k) for r in clients]) for k in reported(clients)},
            "global": ({k: _stats([r.get(f"global_{k}") for r in on_global]) for k in reported(on_global, "global_")}
                       if on_global else {k: _stats([r.get(k) for r in glob]) for k in reported(glob)} if glob
                       else None),
            "megabytes": float(np.mean(traffic)) / 1e6,
        })
    return table


def format_stats(stats: dict | None) -> str:
    if not stats or stats["count"] == 0:
        return "-"
    if stats["count"] == 1:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def comparison_markdown(table: list[dict]) -> str:
    """One line per method; with calibration on, calibrated accuracy / macro-F1 and ECE (raw, cal)
    follow the raw columns for the clients and the global test. A generation task shows ROUGE-L,
    ROUGE-1, exact match and perplexity instead."""
    if generative(table):
        labelled = any("accuracy" in (part or {}) for row in table for part in (row["clients"], row["global"]))
        if not labelled:
            return _generative_markdown(table)
        # several sources with both task kinds: the label scores, then the generation scores
        return comparison_markdown([_only(row, METRICS + CALIBRATED) for row in table]) + "\n\n" + \
            _generative_markdown(table)
    extra = CALIBRATED_COLUMNS if calibrated(table) else ()
    names = (["method", "scored with", "client acc", "client macro-F1", "client AUROC",
              *[f"client {c}" for c, _ in extra], "global acc", "global macro-F1", "global AUROC",
              *[f"global {c}" for c, _ in extra], "MB sent (up+down)"])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in table:
        c, g = row["clients"], row["global"] or {}
        cells = [row["method"], row["scored_with"], *[format_stats(c.get(k)) for k in METRICS],
                 *[format_stats(c.get(k)) for _, k in extra], *[format_stats(g.get(k)) for k in METRICS],
                 *[format_stats(g.get(k)) for _, k in extra], f"{row['megabytes']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _only(row: dict, metrics: tuple[str, ...]) -> dict:
    """A comparison row keeping only `metrics` in its client and global parts."""
    keep = lambda part: None if part is None else {k: v for k, v in part.items() if k in metrics}  # noqa: E731
    return {**row, "clients": keep(row["clients"]), "global": keep(row["global"])}


def _generative_markdown(table: list[dict]) -> str:
    cols = GENERATIVE_COLUMNS
    names = ["method", "scored with", *[f"client {c}" for c, _ in cols], *[f"global {c}" for c, _ in cols],
             "MB sent (up+down)"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in table:
        c, g = row["clients"], row["global"] or {}
        cells = [row["method"], row["scored_with"], *[format_stats(c.get(k)) for _, k in cols],
                 *[format_stats(g.get(k)) for _, k in cols], f"{row['megabytes']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(per_seed: list[dict[str, list[dict]]], run_dir: Path, quiet: bool = False) -> list[dict]:
    table = comparison(per_seed)
    # The raw rows let comparisons from separate runs (e.g. more seeds later) be merged exactly.
    write_json(run_dir / "rows.json", per_seed, indent=None)  # strict JSON: NaN is null
    write_json(run_dir / "comparison.json", table)
    note = ("clients: each client's final score on its own test split, mean ± std over clients"
            " (and seeds), with the method's global adapter or, for personalized methods, the"
            " client's own. global: the final global adapter on the held-out global test set"
            " (± std over seeds); personalized methods have none; decentralized methods (dec_*,"
            " tad_lora): each client's own adapter on the global test, ± std over clients and seeds.")
    if generative(table):
        note += (" Generation: greedy answers (eval.max_new_tokens) scored by ROUGE F-measure and exact match"
                 " (case- and whitespace-normalized); ppl: perplexity of the references (lower is better).")
    if calibrated(table):
        note += (" cal: eval.calibration fitted on each client's own validation split (global test: "
                 "eval.global_calibration), never on a test split; ECE: expected calibration error, "
                 "10 confidence bins (docs/calibration.md).")
    by_task = {t: comparison(cut) for t, cut in per_seed_tasks(per_seed).items()}
    sections = "".join(f"\n\n## Task `{t}`\n\n" + comparison_markdown(rows) for t, rows in by_task.items())
    if by_task:  # several sources: the table above is the overall score (mean over tasks)
        write_json(run_dir / "comparison_tasks.json", by_task)
        note += (" Several sources: 'global' above is the mean over tasks of each task's global test;"
                 " each task's own table follows.")
    (run_dir / "comparison.md").write_text(comparison_markdown(table) + "\n\n" + note + sections + "\n",
                                           encoding="utf-8")
    from fedlora.report.plots import plot_comparison, plot_methods_by_round

    if generative(table):  # a generation task: ROUGE-L and exact match take accuracy's and AUROC's place
        plot_comparison(table, run_dir / "comparison.png", metric="rougeL")
        plot_methods_by_round(per_seed, run_dir, metrics=("rougeL", "exact_match"))
    else:
        plot_comparison(table, run_dir / "comparison.png")
        plot_methods_by_round(per_seed, run_dir)  # comparison_rounds.png: each method by round
    if not quiet:
        from fedlora.report.progress import print_comparison

        print_comparison(table, note)
    return table
