"""Results per task of a federation of several sources (data.clients; fl/sources.py).

Rows of such a run carry `task`; each source's global test is client 'global:<task>' and client
'global' is the overall score (mean over tasks). `task_rows` cuts one task's rows out, with its
global test as client 'global' again, so every summary and table of one task is the usual one.
"""

from __future__ import annotations

from fedlora.config.sources import GLOBAL_PREFIX


def tasks_of(rows: list[dict]) -> list[str]:
    """The tasks the rows name, in order of first appearance ([] for a one-source run)."""
    return list(dict.fromkeys(r["task"] for r in rows if r.get("task") is not None))


def task_rows(rows: list[dict], task: str) -> list[dict]:
    """`task`'s client rows, its global test as client 'global', and the server rows (traffic);
    without their `task` key: they are one task's rows now."""
    out = []
    for r in rows:
        if r.get("client") == GLOBAL_PREFIX + task:
            out.append({**r, "client": "global"})
        elif r.get("task") == task and isinstance(r.get("client"), int) or r.get("client") == "server":
            out.append(r)
    return [{k: v for k, v in r.items() if k != "task"} for r in out]


def per_seed_tasks(per_seed: list[dict[str, list[dict]]]) -> dict[str, list[dict[str, list[dict]]]]:
    """{task: per_seed cut to that task}, for the tasks any method's rows name."""
    tasks = list(dict.fromkeys(t for seed in per_seed for rows in seed.values() for t in tasks_of(rows)))
    return {t: [{m: task_rows(rows, t) for m, rows in seed.items()} for seed in per_seed] for t in tasks}
