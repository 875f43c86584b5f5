"""`fedlora concordia`: Concordia and its baselines on identical partitions, budget and seeds.

For each seed the federation is prepared once; then real-data training (Concordia off, the
upper reference) and every requested variant of `concordia.variant` run the config's server
method (`fl.method`) on it. Each lands in `<variant>:<method>-seed<k>/` with its metrics,
`quality.jsonl` and `quality.png`; the top of the run directory gets `comparison.json/.md/.png`
(the same table `fedlora compare` writes) and `concordia.md`, which adds per variant the
spread of client accuracy (stability), the shifted test split (when `data.shift_column` is set)
and the final synthetic-table quality averaged over clients.

>>> from fedlora import load_config                                        # doctest: +SKIP
>>> compare_variants(load_config("concordia_tiny"), ["concordia", "static", "decoupled"])
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from fedlora.config import ConfigError, RunConfig
from fedlora.experiment import run_per_seed
from fedlora.fl.federation import Federation
from fedlora.report.html import write_report
from fedlora.report.summary import write_comparison

REAL = "real"
VARIANTS = ("concordia", "static", "decoupled", "uniform", "local")
QUALITY = ("validity", "tstr_accuracy", "trtr_accuracy", "fidelity_mean", "correlation_gap", "dcr_median",
           "exact_copies", "closer_to_train", "mia_auc")


def compare_variants(cfg: RunConfig, variants: list[str], seeds: list[int] | None = None,
                     quiet: bool = False, fed: Federation | None = None) -> Path:
    """Run 'real' and/or Concordia variants; returns the run directory."""
    unknown = [v for v in variants if v not in (REAL, *VARIANTS)]
    if unknown or not variants:
        raise ConfigError(f"unknown Concordia variant(s) {unknown}; choose from {[REAL, *VARIANTS]}")
    method = cfg.fl.method

    def with_variant(variant: str):
        return lambda c: replace(c, concordia=replace(c.concordia, enabled=variant != REAL,
                                                      variant=c.concordia.variant if variant == REAL else variant))

    jobs = [(f"{v}:{method}", method, with_variant(v)) for v in variants]
    run_dir, per_seed = run_per_seed(cfg, "concordia", jobs, seeds, quiet, fed)
    write_comparison(per_seed, run_dir, quiet=quiet)
    (run_dir / "concordia.md").write_text(variant_table(per_seed), encoding="utf-8")
    write_report(run_dir)
    return run_dir


def _final_round(rows: list[dict]) -> list[dict]:
    last = max((r["round"] for r in rows if "round" in r), default=None)
    return [r for r in rows if r.get("round") == last]


def variant_table(per_seed: list[dict[str, list[dict]]]) -> str:
    """Stability, shift robustness and final synthetic quality per variant (mean over seeds)."""
    labels = [k for k in per_seed[0] if ":" in k]
    header = ["variant", "client acc std", "shifted acc", "shifted AUROC", *QUALITY]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        spread, shifted_acc, shifted_auc, quality = [], [], [], {q: [] for q in QUALITY}
        for seed_rows in per_seed:
            final = _final_round(seed_rows[label])
            accs = [r["accuracy"] for r in final if isinstance(r.get("client"), int) and "accuracy" in r]
            if accs:
                spread.append(float(np.std(accs)))
            for r in final:
                if r.get("client") == "shifted":
                    shifted_acc.append(r.get("accuracy", np.nan))
                    shifted_auc.append(r.get("auroc", np.nan))
            last_quality = {}
            for r in seed_rows[label]:  # each client's latest quality report
                if isinstance(r.get("client"), int) and "syn_fidelity_mean" in r:
                    last_quality[r["client"]] = r
            for q in QUALITY:
                vals = [r.get(f"syn_{q}") for r in last_quality.values()]
                vals = [v for v in vals if isinstance(v, (int, float))]
                if vals:
                    quality[q].append(float(np.mean(vals)))
        cells = [label, _fmt(spread), _fmt(shifted_acc), _fmt(shifted_auc), *(_fmt(quality[q]) for q in QUALITY)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nclient acc std: spread of the clients' final accuracy (stability; lower is steadier). "
            "shifted: the global adapter on rows above the data.shift_column quantile that no client saw. "
            "Quality columns: each client's last synthetic table, mean over clients (ideal: tstr near trtr, "
            "fidelity 1, correlation gap 0, exact copies 0, closer_to_train and mia_auc near 0.5).\n")
    return "\n".join(lines) + "\n" + note


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return "-" if not values else f"{np.mean(values):.3f}"

