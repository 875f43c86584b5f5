"""`fedlora robustness`: attacks x aggregators x f x worker momentum x seeds, in the simulator.

For each seed the Federation is prepared once (the model is reused across seeds); every cell
(aggregator chain, f, attack, momentum) then runs the config's method with f Byzantine clients
out of `partition.num_clients`, the chain told to tolerate f. f = 0 has no attacker, so it runs
once per (aggregator, momentum) under the attack 'none'.

Per cell and seed it records the final global-test accuracy and AUROC, the mean accuracy of the honest
clients on their own test sets, and a model-free signal: the relative distance of the final
global update ΔW = B A from that of a clean reference run (the method's own aggregation, no
Byzantine client, no momentum, same seed):

    deviation = ||ΔW_cell - ΔW_ref|| / ||ΔW_ref||      (all LoRA layers together)

A cell whose chain cannot tolerate f for the sampled n (e.g. krum needs n > 2f + 2) is marked
'n/a'. Writes `sweep.jsonl` (one row per cell and seed), `sweep.md` (tables with mean ± std over
seeds and the worst case over attacks per f) and `heatmap.png`.

>>> from fedlora import load_config                                   # doctest: +SKIP
>>> robustness_sweep(load_config("robustness_tiny"), ["sign_flip", "alie"], ["mean", "median"],
...                  [0, 1, 2], [None, 0.9], [0, 1, 2])
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedlora.config import RobustConfig, RunConfig
from fedlora.fl.engine import Simulator
from fedlora.fl.preflight import preflight
from fedlora.jsonio import jsonl_lines, write_json
from fedlora.report.trackers import open_trackers
from fedlora.report.summary import final_rows

log = logging.getLogger("fedlora")

DEFAULT_ATTACKS = ["sign_flip", "ipm", "alie", "gaussian"]
DEFAULT_AGGREGATORS = ["mean", "median", "trimmed_mean", "krum", "nnm+trimmed_mean"]
DEFAULT_FS = [0, 1, 2, 3]
DEFAULT_MOMENTUM: list[float | None] = [None, 0.9]


def parse_chain(spec: list | str) -> list:
    """'nnm+trimmed_mean' -> ['nnm', 'trimmed_mean']; a list is kept as it is."""
    if isinstance(spec, str):
        return [part.strip() for part in spec.split("+") if part.strip()]
    return list(spec)


def chain_label(spec: list | str) -> str:
    items = parse_chain(spec)
    return "+".join(item if isinstance(item, str) else next(iter(item)) for item in items)


def momentum_label(beta: float | None) -> str:
    return "none" if beta is None else f"{beta:g}"


def row_label(aggregator: str, beta: float | None) -> str:
    return aggregator if beta is None else f"{aggregator} (m={beta:g})"


def _delta_w(adapter: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every LoRA layer's B @ A, flattened and concatenated (sorted by layer name)."""
    parts = []
    for key in sorted(adapter):
        if key.endswith("lora_A"):
            b = adapter.get(key[: -len("lora_A")] + "lora_B")
            if b is not None:
                parts.append((b.double() @ adapter[key].double()).flatten())
    if not parts:  # no (A, B) pairs: fall back to the factors themselves
        parts = [adapter[k].double().flatten() for k in sorted(adapter)]
    return torch.cat(parts)


def _run_cell(fed, method: str, top_dir: Path | None = None,
              name: str = "") -> tuple[dict, torch.Tensor | None, list[int]]:
    """Run one simulation; returns (metrics, ΔW of the final global adapter, byzantine ids).
    With report.log_to, the cell's rounds go to its trackers as run `name` (under top_dir/name)."""
    trackers = open_trackers(fed.cfg, top_dir / name, name, top_dir) if top_dir is not None else None
    sim = Simulator(fed, method, on_round=None if trackers is None else trackers.log_round)
    status = "FAILED"
    try:
        result = sim.run()
        status = "FINISHED"
    finally:
        if trackers is not None:
            trackers.close(status)
    final = final_rows(result.rows)
    glob = [r for r in final if r["client"] == "global"]
    honest = [r for r in final if isinstance(r["client"], int) and not r.get("byzantine")
              and r["client"] not in sim.byzantine]
    metrics = {
        "accuracy": glob[0]["accuracy"] if glob else float("nan"),
        # AUROC reads the learned ranking even while a short budget leaves accuracy at a majority class.
        "auroc": glob[0].get("auroc", float("nan")) if glob else float("nan"),
        "honest_client_accuracy": float(np.mean([r["accuracy"] for r in honest])) if honest else float("nan"),
    }
    adapter = sim.method.global_adapter(result.state.server)
    dw = _delta_w(adapter) if adapter is not None else None
    return metrics, dw, list(sim.byzantine)


def robustness_sweep(cfg: RunConfig, attacks: list[str] | None = None,
                     aggregators: list[list | str] | None = None, fs: list[int] | None = None,
                     momentum: list[float | None] | None = None, seeds: list[int] | None = None,
                     quiet: bool = False, attack_args: dict[str, dict] | None = None) -> Path:
    """Run the sweep and write sweep.jsonl, sweep.md and heatmap.png into a fresh run directory.

    `attack_args` maps an attack name to its options (e.g. {"sign_flip": {"scale": 100}}); an
    attack not named there uses the config's robust.attack_args when robust.attack is that
    attack, else the attack's registered defaults.
    """
    from fedlora.experiment import reseed, start_run_dir  # here, not at the top: avoids an import cycle

    preflight(cfg)  # the cells' own configs replace robust, so cfg.robust.attack is checked here
    attacks = list(DEFAULT_ATTACKS if attacks is None else attacks)
    aggregators = list(DEFAULT_AGGREGATORS if aggregators is None else aggregators)
    fs = sorted(set(DEFAULT_FS if fs is None else fs))
    momentum = list(DEFAULT_MOMENTUM if momentum is None else momentum)
    seeds = list(seeds or [cfg.seed])
    attack_args = dict(attack_args or {})
    n = cfg.partition.num_clients
    if any(f < 0 or f >= n for f in fs):
        raise ValueError(f"every f must be in [0, partition.num_clients) = [0, {n}); got {fs}")
    if any(b is not None and not 0 <= b < 1 for b in momentum):
        raise ValueError(f"momentum values must be in [0, 1) or none; got {momentum}")
    from fedlora.fl.attacks import available_attacks

    unknown = [a for a in attacks if a not in available_attacks() and not a.startswith("malformed:")]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; one of {', '.join(available_attacks())}")
    method = cfg.fl.method

    def args_for(attack: str) -> dict:
        if attack in attack_args:
            return dict(attack_args[attack])
        return dict(cfg.robust.attack_args) if cfg.robust.attack == attack else {}

    # Data and model errors before any directory is written (the loop reuses this federation).
    fed = reseed(replace(cfg, seed=seeds[0], robust=RobustConfig()), seeds[0], None)
    run_dir = start_run_dir(cfg, "robustness")
    sweep_spec = {"method": method, "num_clients": n, "attacks": attacks,
                  "attack_args": {a: args_for(a) for a in attacks},
                  "aggregators": [chain_label(a) for a in aggregators], "fs": fs,
                  "momentum": momentum, "seeds": seeds}
    write_json(run_dir / "sweep.json", sweep_spec)
    jsonl = run_dir / "sweep.jsonl"
    started = time.perf_counter()
    rows: list[dict] = []
    for seed in seeds:
        scfg = replace(cfg, seed=seed, robust=RobustConfig())
        fed = reseed(scfg, seed, fed)
        # The clean reference: the method's own aggregation, every client honest.
        _, ref_dw, _ = _run_cell(fed, method, run_dir, f"reference-seed{seed}")
        for agg in aggregators:
            chain, label = parse_chain(agg), chain_label(agg)
            for f in fs:
                for attack in (["none"] if f == 0 else attacks):
                    for beta in momentum:
                        robust = RobustConfig(aggregator=chain, f=f, byzantine=f, attack=attack,
                                              attack_args=args_for(attack) if attack != "none" else {},
                                              momentum=beta)
                        cell_fed = replace(fed, cfg=replace(scfg, robust=robust))
                        row = {"seed": seed, "aggregator": label, "f": f, "attack": attack,
                               "attack_args": robust.attack_args, "momentum": beta}
                        t0 = time.perf_counter()
                        try:
                            metrics, dw, byz = _run_cell(cell_fed, method, run_dir, f"{label}-f{f}-{attack}-m"
                                                         f"{momentum_label(beta)}-seed{seed}")
                        except ValueError as exc:  # the chain's condition fails for the sampled n
                            row.update({"valid": False, "reason": str(exc)})
                        else:
                            dev = float("nan")
                            if dw is not None and ref_dw is not None and ref_dw.shape == dw.shape:
                                dev = float((dw - ref_dw).norm() / ref_dw.norm().clamp_min(1e-30))
                            row.update({"valid": True, **metrics, "deviation": dev, "byzantine": byz})
                        row["seconds"] = round(time.perf_counter() - t0, 2)
                        rows.append(row)
                        with jsonl.open("a", encoding="utf-8") as fh:
                            fh.write(jsonl_lines([row]))  # strict JSON: NaN is null
                        if not quiet:
                            shown = (f"acc={row['accuracy']:.3f} dev={row['deviation']:.3g}" if row["valid"]
                                     else f"n/a ({row['reason']})")
                            log.info("seed %d  %-18s f=%d %-10s m=%-4s %s", seed, label, f, attack,
                                     momentum_label(beta), shown)
    table = summarize_sweep(rows)
    (run_dir / "sweep.md").write_text(sweep_markdown(table, sweep_spec, time.perf_counter() - started),
                                      encoding="utf-8")
    plot_heatmap(table, run_dir / "heatmap.png")
    from fedlora.report.html import write_report

    write_report(run_dir)
    return run_dir  # the CLI prints it once, as `results: DIR`


# --- tables --------------------------------------------------------------------------------
def _columns(rows: list[dict]) -> list[tuple[str, int]]:
    """(attack, f) columns: f = 0 ('none') first, then per f each attack in first-seen order."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows if r["f"] > 0))
    fs = sorted({r["f"] for r in rows})
    return [(a, f) for f in fs for a in (["none"] if f == 0 else attacks)]


def summarize_sweep(rows: list[dict]) -> dict:
    """{'rows': [(aggregator, momentum)], 'columns': [(attack, f)], metric: {(row, col): stats}}.

    stats is {'mean', 'std', 'count'} over valid seeds, or None for an invalid (n/a) cell.
    A 'worst' entry per (row, f) holds the minimum accuracy (maximum deviation) over attacks of
    the per-attack means.
    """
    row_keys = list(dict.fromkeys((r["aggregator"], r["momentum"]) for r in rows))
    cols = _columns(rows)
    out: dict = {"rows": row_keys, "columns": cols, "fs": sorted({f for _, f in cols})}
    for metric, worst_fn in (("accuracy", min), ("auroc", min), ("honest_client_accuracy", min), ("deviation", max)):
        cells, worst = {}, {}
        for rk in row_keys:
            for col in cols:
                sel = [r for r in rows if (r["aggregator"], r["momentum"]) == rk and (r["attack"], r["f"]) == col]
                vals = [r[metric] for r in sel if r.get("valid")]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                if sel and not any(r.get("valid") for r in sel):
                    cells[(rk, col)] = None
                elif vals:
                    cells[(rk, col)] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "count": len(vals)}
            for f in out["fs"]:
                means = [cells[(rk, c)]["mean"] for c in cols if c[1] == f and cells.get((rk, c))]
                worst[(rk, f)] = worst_fn(means) if means else None
        out[metric] = cells
        out[f"worst_{metric}"] = worst
    return out


def _fmt(stats: dict | None, digits: int) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _markdown_table(table: dict, metric: str, digits: int) -> list[str]:
    cols, fs = table["columns"], [f for f in table["fs"] if f > 0]
    head = ["aggregator"] + [f"{a} f={f}" if f else "no attack f=0" for a, f in cols] + [f"worst f={f}" for f in fs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rk in table["rows"]:
        cells = [row_label(*rk)] + [_fmt(table[metric].get((rk, c)), digits) for c in cols]
        for f in fs:
            w = table[f"worst_{metric}"].get((rk, f))
            cells.append("n/a" if w is None else f"**{w:.{digits}f}**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep_markdown(table: dict, spec: dict, seconds: float | None = None) -> str:
    lines = [f"# Robustness sweep: {spec['method']}, {spec['num_clients']} clients, seeds {spec['seeds']}", ""]
    lines += [f"Attacks: {', '.join(spec['attacks'])} (options: {json.dumps(spec['attack_args'])}). "
              "Cells: mean ± std over seeds; 'worst' is the worst per-attack mean at that f; "
              "n/a: the chain cannot tolerate f Byzantine out of the sampled clients."]
    if seconds is not None:
        lines += ["", f"Wall time: {seconds:.0f} s."]
    for metric, title, digits in (
            ("accuracy", "Final global-test accuracy (higher is better)", 3),
            ("auroc", "Final global-test AUROC (higher is better)", 3),
            ("honest_client_accuracy", "Final accuracy, mean over honest clients' own test sets", 3),
            ("deviation", "Deviation of the final global ΔW = BA from the clean run, "
                          "||ΔW - ΔW_ref|| / ||ΔW_ref|| (lower is better)", 2)):
        lines += ["", f"## {title}", ""] + _markdown_table(table, metric, digits)
    return "\n".join(lines) + "\n"


def plot_heatmap(table: dict, path: Path) -> Path:
    """Aggregator rows x (attack, f) columns, annotated: accuracy on top, deviation below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = table["rows"], table["columns"]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(cols) + 3), 1.0 + 0.9 * len(rows) * 2 + 1.5))
    for ax, metric, title, cmap, fmt in (
            (axes[0], "accuracy", "final global-test accuracy", "viridis", "{:.2f}"),
            (axes[1], "deviation", "deviation of ΔW from the clean run (log10)", "magma_r", "{:.2g}")):
        data = np.full((len(rows), len(cols)), np.nan)
        for i, rk in enumerate(rows):
            for j, c in enumerate(cols):
                s = table[metric].get((rk, c))
                if s is not None:
                    data[i, j] = s["mean"]
        shown = np.log10(np.clip(data, 1e-6, None)) if metric == "deviation" else data
        im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.03)
        for i in range(len(rows)):
            for j in range(len(cols)):
                text = "n/a" if math.isnan(data[i, j]) else fmt.format(data[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if math.isnan(data[i, j]) else "white")
        ax.set_xticks(range(len(cols)), [f"{a}\nf={f}" if f else "none\nf=0" for a, f in cols], fontsize=7)
        ax.set_yticks(range(len(rows)), [row_label(*rk) for rk in rows], fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
