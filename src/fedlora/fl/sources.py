"""A federation of several sources (data.clients): each institution its own table and task.

`fl/federation.prepare_sources` loads every source first (a bad one fails, naming its entry, before the model
is loaded or a run directory exists), then prepares each as the one-table path does, all on one
shared model and tokenizer, and joins them:

- `Federation.parts[s]` is source s's own Federation (its table, partition, clients, global
  test); the joined Federation's `clients` are every part's clients in entry order, so client
  ids run over the entries (config/sources.py). Its `table` and `partition` are None: code that
  needs one table must go through the parts.
- Scoring dispatches by set: `SourcesScorer` holds one scorer per part (a label scorer for a
  table, a generation scorer for generation records) and scores each client split and each
  global test with its own part's, calibrated within its part (eval.global_calibration pools
  the validation sets of that part's clients only: other tasks have other classes).
- Rows: each client row carries `task`; each part's global test gives a row for client
  `global:<task>`; the row for client `global` is the overall score, the mean over tasks of
  each metric the tasks report (macro over tasks, ours: every task counts once, whatever its
  size; a metric only some tasks have is averaged over those).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from fedlora.config import RunConfig
from fedlora.config.sources import GLOBAL_PREFIX, source_specs
from fedlora.config.typed import MEMORY_PREFIX
from fedlora.data import DataError, load_table


def load_sources(cfg: RunConfig) -> list:
    """Every source's Table, in entry order; DataError naming `data.clients[i]` otherwise."""
    tables = []
    for spec in source_specs(cfg):
        if spec.frame is None and spec.data.source.startswith(MEMORY_PREFIX):
            raise DataError(f"data.clients[{spec.index}] ({spec.name}) was a DataFrame given in Python "
                            f"({spec.data.source}); its rows are not kept in the config or run directory. "
                            "Pass the frame again in Python, or write it to a file (df.to_parquet('x.parquet')) "
                            "and give that path as the entry's source")
        try:
            tables.append(load_table(spec.data, seed=cfg.seed) if spec.frame is None else _frame_table(spec, cfg.seed))
        except DataError as exc:
            raise DataError(f"data.clients[{spec.index}] ({spec.name}): {exc}") from None
    return tables


def _frame_table(spec, seed: int):
    """A DataFrame given in Python, read by the very path a file takes (every check and message of
    data/tables.py): written to a temporary CSV (JSONL for generation records), loaded, removed.
    Ours: one reader for files and frames rather than a second cleaning path to keep in step."""
    with tempfile.TemporaryDirectory(prefix="fedlora-frame-") as tmp:
        generation = spec.data.task == "generation"
        path = Path(tmp) / ("records.jsonl" if generation else "table.csv")
        if generation:
            spec.frame.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            spec.frame.to_csv(path, index=False)
        try:
            table = load_table(dataclasses.replace(spec.data, source=str(path)), seed=seed)
        except DataError as exc:
            raise DataError(str(exc).replace(str(path), "the DataFrame")) from None
    return dataclasses.replace(table, name=spec.name, source=spec.data.source)


def is_multi(fed) -> bool:
    return getattr(fed, "parts", None) is not None


def tables_of(fed) -> list | None:
    """The parts' tables (to prepare another seed without reading the files again), or None."""
    return [p.table for p in fed.parts] if is_multi(fed) else None


class SourcesScorer:
    """The `Scorer` interface over a multi-source Federation: each set scored by its own part's."""

    def __init__(self, fed, part_scorer):
        """`part_scorer(part)`: the one-table scorer (fl/scoring.make_scorer, passed in: no cycle)."""
        self.fed = fed
        self.parts = [part_scorer(p) for p in fed.parts]
        self.on = any(s.on for s in self.parts)
        self._part_of: dict[int, int] = {}  # id(set) -> part (sets are the parts' own objects)
        for i, part in enumerate(fed.parts):
            for c in part.clients:
                for split in (c.train, c.val, c.test):
                    self._part_of[id(split)] = i
            self._part_of[id(part.global_test)] = i
        self._cal_part: dict[int, int] = {}

    def part(self, data) -> int:
        try:
            return self._part_of[id(data)]
        except KeyError:
            raise ValueError("this set belongs to none of the federation's sources") from None

    @property
    def samples(self) -> list[dict]:
        out = []
        for task, scorer in zip(self.fed.tasks, self.parts):
            out += [{**s, "task": task} for s in (scorer.samples or [])]
        return out

    def content_free_scores(self):
        return None  # per part: each calibration_set scores its own table's content-free prompts

    def calibration_set(self, val, content_free=None):
        i = self.part(val)
        cal = self.parts[i].calibration_set(val)
        if cal is not None:
            self._cal_part[id(cal)] = i
        return cal

    def metrics(self, data, cal) -> dict:
        i = self.part(data)
        if isinstance(cal, dict):
            cal = cal.get(i)
        return self.parts[i].metrics(data, cal)

    def global_set(self, under_global=None) -> dict:
        """{part: its global calibration set}, from the given sets of that part's clients."""
        groups: dict[int, list] = {}
        for cal in under_global or []:
            groups.setdefault(self._cal_part.get(id(cal), -1), []).append(cal)
        return {i: s.global_set(groups.get(i) or None) for i, s in enumerate(self.parts)}


def global_tests(fed) -> list[tuple[str, object]]:
    """(client name, set) of each part's global test with rows: 'global:<task>'."""
    return [(GLOBAL_PREFIX + task, part.global_test) for task, part in zip(fed.tasks, fed.parts)
            if len(part.global_test)]


def tag_tasks(fed, rows: list[dict]) -> list[dict]:
    """Each client row gets its `task`; a 'global:<task>' row its task; then the overall 'global' row."""
    if not is_multi(fed):
        return rows
    tag_clients(rows, fed.client_task)
    per_task = [r for r in rows if isinstance(r.get("client"), str) and r["client"].startswith(GLOBAL_PREFIX)]
    if per_task:
        rows.append(overall_row(per_task))
    return rows


def tag_clients(rows: list[dict], client_task: list[str]) -> list[dict]:
    """Each client row gets its client's `task`, each 'global:<task>' row that task (in place)."""
    for r in rows:
        if isinstance(r.get("client"), int) and r["client"] < len(client_task):
            r.setdefault("task", client_task[r["client"]])
        elif isinstance(r.get("client"), str) and r["client"].startswith(GLOBAL_PREFIX):
            r.setdefault("task", r["client"][len(GLOBAL_PREFIX):])
    return rows


def overall_row(per_task: list[dict]) -> dict:
    """The 'global' row: each numeric metric's mean over the tasks that report it."""
    keys = [k for k in dict.fromkeys(k for r in per_task for k in r)
            if k not in ("client", "split", "task", "round", "method")
            and all(isinstance(r.get(k, 0.0), (int, float)) and not isinstance(r.get(k), bool) for r in per_task)]
    out = {"client": "global", "split": "global_test", "tasks": [r["task"] for r in per_task],
           **{k: per_task[0][k] for k in ("round", "method") if k in per_task[0]}}
    for k in keys:
        vals = [float(r[k]) for r in per_task if r.get(k) is not None and not np.isnan(float(r[k]))]
        if vals:
            out[k] = float(np.mean(vals)) if k != "n" else int(sum(vals))
    return out


def partition_info(fed) -> list[dict]:
    """partition.json rows of every client, with its task and source (ids federation-wide)."""
    out, offset = [], 0
    for task, part in zip(fed.tasks, fed.parts):
        table = part.table
        for client in part.partition.clients:
            counts = np.bincount(table.labels[client.train], minlength=len(table.classes))
            out.append({"client": client.client_id + offset, "task": task, "source": table.source or table.name,
                        "train": len(client.train), "val": len(client.val), "test": len(client.test),
                        "train_classes": dict(zip(table.classes, counts.tolist()))})
        offset += len(part.clients)
    return out


def describe(fed) -> dict:
    """The data part of a model card / summary: every source, its task kind and clients."""
    return {"sources": [dataclasses.asdict(s.data) | {"name": s.name, "clients": s.clients,
                                                       "kind": p.table.kind, "licence": p.table.license}
                        for s, p in zip(source_specs(fed.cfg), fed.parts)]}
