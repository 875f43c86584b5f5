"""The common representation of real and synthetic frames that every quality metric compares.

`_align` puts a frame's scored columns (features except text, then the target) in table order:
numeric as float64, booleans as True/False, other kinds as stripped strings, None for missing,
so that "5" equals 5.0 and "True" equals True on both sides (`synth/quality.py`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedlora.data.schema import _TRUE, Table  # booleans read as fedlora.data reads them

_MISSING = "(missing)"


def _kinds(table: Table) -> dict[str, str]:
    """Column -> kind for every scored column: features except text, then the target."""
    kinds = {c.name: c.kind for c in table.columns if c.kind != "text"}
    if not kinds:
        raise ValueError(f"table {table.name!r} has only text features; quality metrics need tabular ones")
    return {**kinds, table.target: "target"}


def _label(value) -> str | None:
    """A category or class name as the table writes it: 1.0 -> '1', missing -> None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    integral = isinstance(value, (float, np.floating)) and float(value).is_integer()
    return str(int(value)) if integral else str(value).strip()


def _align(frame: pd.DataFrame, table: Table, name: str) -> pd.DataFrame:
    """Scored columns in order: numeric as float64, other kinds as objects, None = missing.

    One representation for real and generated rows, so that "5" equals 5.0 and "True" equals True.
    """
    kinds = _kinds(table)
    missing = [c for c in kinds if c not in frame.columns]
    if missing and len(frame) == 0:  # a generator that wrote nothing: no columns to check
        return pd.DataFrame({c: pd.Series(dtype=float if k == "numeric" else object)
                             for c, k in kinds.items()})
    if missing:
        extra = [c for c in frame.columns if c not in kinds]
        raise ValueError(f"{name} rows lack column(s) {missing} of table {table.name!r}"
                         + (f"; unexpected column(s) {extra} - renamed?" if extra else ""))
    out = {}
    for col, kind in kinds.items():
        s = frame[col]
        if kind == "numeric":
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif kind == "boolean":
            out[col] = s.map(lambda v: None if pd.isna(v) else str(v).strip().lower() in _TRUE).astype(object)
        else:
            out[col] = s.map(_label).astype(object)
    return pd.DataFrame(out).reset_index(drop=True)


def _aligned(table: Table, **frames: pd.DataFrame) -> list[pd.DataFrame]:
    return [_align(frame, table, name) for name, frame in frames.items()]


def _clean(value):
    """JSON-able: numpy scalars -> Python, NaN/inf -> None."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value
