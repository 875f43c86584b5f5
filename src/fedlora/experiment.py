"""Run recipes: one method (`run`), or several on the same partitions (`compare`, `demo`).

The CLI is a thin layer over these functions; a notebook can call them directly:

>>> from fedlora import load_config, compare                       # doctest: +SKIP
>>> out = compare(load_config("configs/demo.yaml"), ["fedit", "local"])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from fedlora.config import RunConfig, load_config
from fedlora.fl.checkpoint import (  # noqa: F401  (config_differences, check_checkpoint_config: re-exported)
    Checkpoint,
    CheckpointError,
    check_checkpoint_config,
    config_differences,
    load_latest,
    restore_state,
)
from fedlora.fl.engine import RunResult, RunState, Simulator
from fedlora.fl.federation import Federation, prepare
from fedlora.fl.gossip import GossipSimulator
from fedlora.fl.methods import build_method, method_class, method_options
from fedlora.fl.preflight import preflight
from fedlora.fl.scoring import make_scorer
from fedlora.fl.sources import (
    GLOBAL_PREFIX,
    global_tests,
    is_multi,
    partition_info,
    tables_of,
    tag_tasks,
)
from fedlora.jsonio import jsonl_lines
from fedlora.jsonio import write_json as _write_json
from fedlora.model.export import save_adapters
from fedlora.model.lora import init_adapter_state, load_adapter_state
from fedlora.report.html import write_report
from fedlora.report.progress import RoundProgress
from fedlora.report.summary import summarize, write_comparison
from fedlora.report.trackers import open_trackers
from fedlora.train.baseline import classical_baseline

log = logging.getLogger("fedlora")


def new_run_dir(cfg: RunConfig, label: str) -> Path:
    """A fresh, empty directory under output_dir; an existing one is never reused or overwritten."""
    base = Path(cfg.output_dir) / (cfg.run_name or f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def start_run_dir(cfg: RunConfig, label: str) -> Path:
    """A new run directory holding the resolved config.yaml."""
    path = new_run_dir(cfg, label)
    write_config(path, cfg)
    return path


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    """The resolved config as `run_dir/config.yaml` (what `resume` reads back)."""
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def reseed(cfg: RunConfig, seed: int, fed: Federation | None) -> Federation:
    """The federation for `seed` (new partitions and splits), reusing `fed`'s loaded model."""
    cfg = replace(cfg, seed=seed)
    if fed is None:
        return prepare(cfg)
    if fed.cfg == cfg:
        return fed
    return prepare(cfg, model=fed.model, tokenizer=fed.tokenizer, table=tables_of(fed) or fed.table)


def _partition_info(fed: Federation) -> list[dict]:
    if is_multi(fed):  # several sources: every client with its task and source
        return partition_info(fed)
    classes = fed.table.classes
    info = []
    for client in fed.partition.clients:
        counts = np.bincount(fed.table.labels[client.train], minlength=len(classes))
        info.append({"client": client.client_id, "train": len(client.train), "val": len(client.val),
                     "test": len(client.test), "train_classes": dict(zip(classes, counts.tolist()))})
    return info


ZERO_SHOT_SAMPLES = "zero-shot-samples.jsonl"
"""A generation run's zero-shot answers (the untrained model's), one line each, every seed."""


def zero_shot(fed: Federation, samples_to: Path | None = None) -> list[dict]:
    """The base model before any training (B = 0 makes the adapter a no-op), calibrated as the
    trained rows are (eval.calibration), so the comparison stays fair. On a generation task the
    sample answers are appended to `samples_to` when given (method zero-shot, round 0, the seed)."""
    model = fed.model
    load_adapter_state(model, init_adapter_state(model, fed.cfg.seed))
    scorer = make_scorer(fed)  # a generation task: ROUGE, exact match, perplexity; no calibration
    cf = scorer.content_free_scores() if scorer.on else None  # one base model: scored once
    cals = [scorer.calibration_set(c.val, cf) for c in fed.clients]
    rows = [{"client": i, "split": "test", **scorer.metrics(c.test, cal)}
            for i, (c, cal) in enumerate(zip(fed.clients, cals))]
    tests = [("global", fed.global_test)] if not is_multi(fed) else global_tests(fed)
    if fed.cfg.eval.global_test and tests and len(tests[0][1]):
        cal = scorer.global_set([c for c in cals if c is not None])
        rows += [{"client": name, "split": "global_test", **scorer.metrics(data, cal)} for name, data in tests]
    rows = tag_tasks(fed, rows)
    if samples_to is not None and scorer.samples:
        with Path(samples_to).open("a", encoding="utf-8") as out:
            out.write(jsonl_lines([{"method": "zero-shot", "round": 0, "seed": fed.cfg.seed, **x}
                                   for x in scorer.samples]))
    return [{**r, "round": 0, "method": "zero-shot"} for r in rows]


def baseline(fed: Federation) -> list[dict]:
    kind = fed.cfg.eval.baseline
    if is_multi(fed):  # per table source, its clients' ids federation-wide, its global test by task
        rows, offset = [], 0
        for task, part in zip(fed.tasks, fed.parts):
            if part.table.kind != "generation":
                for r in baseline(part):
                    c = r["client"]
                    rows.append({**r, "client": c + offset if isinstance(c, int) else GLOBAL_PREFIX + task, "task": task})
            offset += len(part.clients)
        return tag_tasks(fed, rows)
    rows = classical_baseline(fed.table, [c.rows["train"] for c in fed.clients],
                              [c.rows["test"] for c in fed.clients], fed.global_rows, kind, fed.cfg.seed)
    return [{**r, "round": 0, "method": f"baseline-{kind}"} for r in rows]


def run_method(fed: Federation, method: str, run_dir: Path, quiet: bool = False,
               seed: int | None = None, zero_shot_rows: list[dict] | None = None,
               resume_from: Checkpoint | None = None, top_dir: Path | None = None) -> RunResult:
    """Run one method on a prepared federation, streaming metrics to `run_dir/metrics.jsonl`.

    `zero_shot_rows`, when given, are drawn as round 0 in the plots (the untrained model).
    With fl.checkpoint, a checkpoint goes to `run_dir/checkpoints/` after every round; with
    `resume_from`, the run continues from that checkpoint and metrics.jsonl is cut back to its rows.
    The trackers of report.log_to get every round's rows too (report/trackers.py); `top_dir`, the
    compare directory above `run_dir`, names their MLflow experiment and holds its default store.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:  # rows of rounds after the checkpoint were never saved in the state
        who = {"method": method, "seed": fed.cfg.seed if seed is None else seed}
        if {k: resume_from.info.get(k) for k in who} != who:
            raise CheckpointError(f"{resume_from.path} was written by {resume_from.info.get('method')} with seed "
                                  f"{resume_from.info.get('seed')}, not {who['method']} with seed {who['seed']}")
        tmp = metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text(jsonl_lines(resume_from.rows), encoding="utf-8")
        tmp.replace(metrics_path)

    def on_round(round_index: int, rows: list[dict]) -> None:
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(jsonl_lines(rows))  # strict JSON: NaN is null (fedlora/jsonio.py)
        progress.update(round_index, rows)
        if trackers is not None:
            trackers.log_round(round_index, rows)

    started = time.perf_counter()
    method_obj = build_method(method, method_options(fed.cfg, method))
    simulator = GossipSimulator if method_obj.decentralized else Simulator  # serverless: fl/gossip.py
    if fed.cfg.concordia.enabled:  # synthetic rows only, any server method (fl/concordia.py)
        from fedlora.fl.concordia import ConcordiaSimulator

        simulator = ConcordiaSimulator
    sim = simulator(fed, method_obj, seed=seed, on_round=on_round, progress=not quiet,
                    checkpoint_dir=run_dir / "checkpoints" if fed.cfg.fl.checkpoint else None)
    rb = fed.cfg.robust
    if rb.byzantine > 0:
        # Who was Byzantine and what they did, beside the metrics (ids depend on the seed).
        _write_json(run_dir / "byzantine.json", {
            "method": method, "seed": sim.seed, "num_clients": len(sim.train_sets),
            "byzantine": sim.byzantine, "attack": rb.attack, "attack_args": rb.attack_args,
            "label_flip": rb.label_flip, "aggregator": rb.aggregator, "f": rb.f, "momentum": rb.momentum,
        })
    # trackers first: if one cannot open, no progress bar is left on the screen
    trackers = open_trackers(fed.cfg, run_dir, run_dir.name if top_dir else f"{method}-seed{sim.seed}", top_dir)
    progress = RoundProgress(method, fed.cfg.fl.rounds, quiet=quiet)  # on_round updates it
    status = "FAILED"
    try:  # an error or Ctrl-C removes the bar too, and gives the terminal its cursor back
        if resume_from is None:
            result = sim.run()
        else:
            result = sim.run(restore_state(RunState, resume_from.fields), resume_from.rows)
        status = "FINISHED"
    finally:
        progress.close()
        if trackers is not None:
            trackers.close(status)
    method_obj.save_extras(result.state.server, run_dir)
    sim.save_extras(result, run_dir)
    write_results(run_dir, fed, method_obj, result.state, result.rows, time.perf_counter() - started,
                  sim.dp_summary(result.state), zero_shot_rows)
    return result


def write_results(run_dir: Path, fed, method, state, rows: list[dict], wall_seconds: float, extra: dict,
                  zero_shot_rows: list[dict] | None = None, data: dict | None = None, adapters: bool = True) -> dict:
    """summary.json, the final adapters and the plots of one method's run; returns the summary.

    Shared by the simulator and the Flower ServerApp (flower/rundir.py), whose `fed` holds no data:
    it passes the card's `data` description itself (model/card.py `nodes_data_description`), and
    `adapters=False` for personal methods, whose adapters it never sees (they stay on the nodes).
    `extra` joins the summary (the privacy report under DP)."""
    summary = summarize(rows, method.name, method.personalized)
    summary["wall_seconds"] = round(wall_seconds, 2)
    summary.update(extra)
    _write_json(run_dir / "summary.json", summary)
    # PEFT folders with fedlora.json and a model card citing the summary (model/export.py)
    if adapters:
        save_adapters(fed, method, state, run_dir / "adapters", summary, data)
    from fedlora.report.plots import plot_rounds

    generative = fed.cfg.data.task == "generation"
    plot_rounds((zero_shot_rows or []) + rows, run_dir / "plots", title=method.name,
                **({"metrics": ("rougeL", "exact_match", "perplexity", "train_loss")} if generative else {}))
    return summary


def _start(cfg: RunConfig, label: str, quiet: bool, fed: Federation | None) -> tuple[Path, Federation]:
    fed = fed or prepare(cfg)  # data, partition and model errors before any directory is written
    run_dir = start_run_dir(cfg, label)
    _write_json(run_dir / "partition.json", _partition_info(fed))
    if not quiet:
        from rich.console import Console

        from fedlora.data import partition_summary

        for part in fed.parts or [fed]:
            Console().print(partition_summary(part.table, part.partition))
    return run_dir, fed


def _references(fed: Federation, run_dir: Path | None = None) -> dict[str, list[dict]]:
    """Zero-shot and classical-baseline rows, as configured (computed once per partition); with
    `run_dir`, a generation task's zero-shot answers go to its zero-shot-samples.jsonl."""
    rows: dict[str, list[dict]] = {}
    if fed.cfg.eval.zero_shot:
        rows["zero-shot"] = zero_shot(fed, None if run_dir is None else run_dir / ZERO_SHOT_SAMPLES)
    kinds = {p.table.kind for p in fed.parts or [fed]}
    if fed.cfg.eval.baseline != "none" and kinds != {"generation"}:  # a classifier needs labels
        rows[f"baseline-{fed.cfg.eval.baseline}"] = baseline(fed)
    return rows


def run(cfg: RunConfig, quiet: bool = False, fed: Federation | None = None) -> Path:
    """`fedlora run`: one method (cfg.fl.method), with zero-shot and baseline rows for context.

    The method's files sit at the top of the run directory; `comparison.md` puts its final
    scores beside the references.
    """
    method_class(cfg.fl.method)  # fail on a bad name before loading anything
    run_dir, fed = _start(cfg, cfg.fl.method, quiet, fed)
    rows = _references(fed, run_dir)
    rows[cfg.fl.method] = run_method(fed, cfg.fl.method, run_dir, quiet=quiet,
                                     zero_shot_rows=rows.get("zero-shot")).rows
    write_comparison([rows], run_dir, quiet=quiet)
    write_report(run_dir)
    return run_dir  # the CLI prints it once, as `results: DIR`


def resume(run_dir: str | Path, quiet: bool = False) -> Path:
    """`fedlora resume RUN_DIR`: continue a `run` directory from its newest good checkpoint.

    The config is the run's own config.yaml; the data, partitions and model are prepared again
    from it (they are derived from the seed), the run state and metric rows come from the
    checkpoint, and every round after it is run again. The result is the same, bit for bit, as a
    run that was never interrupted (docs/reliability.md).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} has no config.yaml; pass a directory written by `fedlora run`")
    cfg = load_config(run_dir / "config.yaml")
    preflight(cfg)
    ckpt = load_latest(run_dir / "checkpoints")
    check_checkpoint_config(ckpt, cfg, str(run_dir / "config.yaml"))
    log.info("resuming %s after round %d of %d", run_dir, ckpt.round, cfg.fl.rounds)
    fed = prepare(cfg)
    rows = _references(fed)
    rows[cfg.fl.method] = run_method(fed, cfg.fl.method, run_dir, quiet=quiet, zero_shot_rows=rows.get("zero-shot"),
                                     resume_from=ckpt).rows
    write_comparison([rows], run_dir, quiet=quiet)
    write_report(run_dir)
    return run_dir


def compare(cfg: RunConfig, methods: list[str], seeds: list[int] | None = None, quiet: bool = False,
            fed: Federation | None = None) -> Path:
    """Several methods on identical partitions and initial adapters, plus zero-shot and the baseline.

    With several seeds, each seed re-partitions the data and re-initializes the adapters; every
    method sees the same partition within a seed. Writes one sub-directory per (method, seed) and
    `comparison.json`, `comparison.md` and `comparison.png` at the top.
    """
    for m in methods:
        method_class(m)
    run_dir, per_seed = run_per_seed(cfg, "compare", [(m, m, None) for m in methods], seeds, quiet, fed)
    write_comparison(per_seed, run_dir, quiet=quiet)
    write_report(run_dir)
    return run_dir


Job = tuple[str, str, Callable[[RunConfig], RunConfig] | None]
"""(label, method, how the label changes the config or None): one run per seed of `run_per_seed`."""


def run_per_seed(cfg: RunConfig, kind: str, jobs: list[Job], seeds: list[int] | None, quiet: bool,
                 fed: Federation | None) -> tuple[Path, list[dict[str, list[dict]]]]:
    """Each job on the same partitions per seed (zero-shot and baseline first): the run directory,
    and per seed {label: rows}, each run in `<label>-seed<k>/`."""
    seeds = seeds or [cfg.seed]
    run_dir, fed = _start(replace(cfg, seed=seeds[0]), kind, quiet, fed)
    per_seed: list[dict[str, list[dict]]] = []
    for seed in seeds:
        fed = reseed(cfg, seed, fed)
        rows = _references(fed, run_dir)
        for label, method, change in jobs:
            job_fed = fed if change is None else replace(fed, cfg=change(fed.cfg))
            rows[label] = run_method(job_fed, method, run_dir / f"{label}-seed{seed}", quiet=quiet, seed=seed,
                                     zero_shot_rows=rows.get("zero-shot"), top_dir=run_dir).rows
        per_seed.append(rows)
    return run_dir, per_seed
