"""Strict JSON for every file fedlora writes: NaN and infinities are written as `null`.

Python's `json.dumps` writes bare `NaN` and `Infinity` by default. Those are not JSON (RFC 8259):
`JSON.parse`, jq, Go's encoding/json and DuckDB reject the whole file. A metric that is undefined
(AUROC on a test split holding one class) has no value, and JSON spells that `null`.

In memory, metric rows keep NaN (numpy's nan-aware means skip it); on disk it is `null`;
`read_jsonl` turns a row's top-level `null` back into NaN (a metric row never holds None itself),
so code that reads metrics.jsonl back sees the rows the run had. Checkpoints need more: resume is
exact, so `tag_nonfinite` writes each non-finite float as {"__float__": "nan"} (still strict JSON)
and `untag_nonfinite` restores it.

>>> dumps({"auroc": float("nan"), "n": 3})
'{"auroc": null, "n": 3}'
>>> untag_nonfinite(tag_nonfinite([float("inf")]))
[inf]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python numbers and lists, non-finite floats as None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text; allow_nan=False makes any non-finite float that slipped through an error."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any, indent: int | None = 2) -> Path:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(value, indent=indent), encoding="utf-8")
    tmp.replace(path)
    return path


def jsonl_lines(rows: list[dict]) -> str:
    """One strict JSON object per line, each ending in a newline."""
    return "".join(dumps(row) + "\n" for row in rows)


def _refuse(name: str):
    raise ValueError(f"not strict JSON: bare {name}")


def loads_strict(text: str) -> Any:
    """Parse `text` as a strict parser would: bare NaN, Infinity or -Infinity raise ValueError."""
    return json.loads(text, parse_constant=_refuse)


def read_jsonl(path: Path) -> list[dict]:
    """Metric rows of a .jsonl file, with each top-level null back as NaN (what the run had)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append({k: float("nan") if v is None else v for k, v in json.loads(line).items()})
    return rows


def tag_nonfinite(value: Any) -> Any:
    """`value` with each non-finite float as {"__float__": "nan" | "inf" | "-inf"} (numpy as Python)."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: tag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tag_nonfinite(v) for v in value]
    return value


def untag_nonfinite(value: Any) -> Any:
    """Inverse of `tag_nonfinite`."""
    if isinstance(value, dict):
        if len(value) == 1 and "__float__" in value:
            return float(value["__float__"])
        return {k: untag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag_nonfinite(v) for v in value]
    return value
