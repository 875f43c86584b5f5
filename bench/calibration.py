"""Raw against calibrated decisions: accuracy and macro-F1 of zero-shot, FedIT and a personalized
method beside the classical baseline, on several configs and seeds (docs/calibration.md).

One `fedlora compare` per config with eval.calibration=both, which reports the 'both' fit and its
two parts ('contextual', 'bias') from the same scores, so every option is measured on identical
runs. "clients" are the clients' own test splits (held out from every fit: each client calibrates
on its own validation split); "global" is the global test, calibrated on the pooled validation
scores (eval.global_calibration=pooled_val).

    python bench/calibration.py --configs demo,german_credit --methods fedit,fedtree --seeds 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_time import markdown_table, write_section  # noqa: E402

import fedlora  # noqa: E402

OPTIONS = (("none", ""), ("contextual", "_contextual"), ("bias", "_bias"), ("both", "_cal"))


def cell(part: dict | None, key: str) -> str:
    stats = (part or {}).get(key)
    if not stats or not stats.get("count"):
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def table_for(comparison: list[dict], where: str) -> list[list[str]]:
    """Rows: method x (accuracy, macro-F1) with one column per calibration option, ECE raw/cal."""
    rows = []
    for row in comparison:
        part = row[where]
        if not part:
            continue
        for metric in ("accuracy", "macro_f1"):
            label = "accuracy" if metric == "accuracy" else "macro-F1"
            values = [cell(part, metric + suffix) if not row["method"].startswith("baseline") or not suffix else "-"
                      for _, suffix in OPTIONS]
            ece = [cell(part, "ece"), cell(part, "ece_cal")] if metric == "accuracy" else ["", ""]
            rows.append([row["method"], label, *values, *ece])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="demo,german_credit")
    ap.add_argument("--methods", default="fedit,fedtree")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every config")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    parts = []
    for name in args.configs.split(","):
        overrides = ["eval.calibration=both", "fl.eval_every=0", *args.set]
        cfg = fedlora.load_config(name, overrides)
        started = time.perf_counter()
        run_dir = fedlora.compare(cfg, args.methods.split(","), seeds=list(range(args.seeds)), quiet=True)
        minutes = (time.perf_counter() - started) / 60
        comparison = json.loads((Path(run_dir) / "comparison.json").read_text())
        table = comparison["methods"] if isinstance(comparison, dict) else comparison
        header = ["method", "metric", *[o for o, _ in OPTIONS], "ECE raw", "ECE cal (both)"]
        for where, title in (("clients", "clients' own test splits (mean ± std over clients and seeds)"),
                             ("global", "global test (mean ± std over seeds)")):
            parts.append(f"**{name}**, {title}; {minutes:.0f} min for {args.seeds} seeds; `{run_dir}`\n\n"
                         + markdown_table(header, table_for(table, where)))
        print(parts[-2], "\n\n", parts[-1], flush=True)
    command = (f"python bench/calibration.py --configs {args.configs} --methods {args.methods} --seeds {args.seeds}"
               + "".join(f" --set {s}" for s in args.set) + (" --write" if args.write else ""))
    text = (f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d')}; load average {load:.2f} before. Each config "
            "with eval.calibration=both and fl.eval_every=0 (scored after the last round); columns are the decision "
            "rule: none = raw argmax of the verbalizer log-likelihoods, contextual = content-free prompts "
            "(arXiv 2101.09690), bias = inverse temperature + per-class bias fitted on the client's own "
            "validation split, both = contextual then bias. The baseline (logistic regression) keeps its "
            "own rule.\n\n" + "\n\n".join(parts))
    if args.write:
        write_section("calibration", "Calibrated label scoring: raw against calibrated decisions", text)


if __name__ == "__main__":
    main()
