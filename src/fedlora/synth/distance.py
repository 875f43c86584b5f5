"""Gower distances between table rows, the one row distance every synthetic-data check uses.

d(x, y) = mean over columns c of d_c, with d_c = min(|x_c - y_c| / range_c, 1) for a numeric
column (range_c taken from the reference rows, so a value outside them counts as far, not as
infinitely far) and d_c = [x_c != y_c] for any other kind. A missing value is at distance 1 from
everything but another missing value. Rows are DataFrames with the same columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _numeric_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if pd.api.types.is_numeric_dtype(frame[c]) and frame[c].dtype != bool]


def gower_matrix(a: pd.DataFrame, b: pd.DataFrame, columns: Sequence[str] | None = None,
                 ranges: dict[str, float] | None = None) -> np.ndarray:
    """(len(a), len(b)) Gower distances. `ranges` (numeric column -> range) default to b's ranges."""
    columns = list(columns if columns is not None else b.columns)
    if len(columns) == 0:
        raise ValueError("gower_matrix needs at least one column")
    numeric = set(_numeric_columns(b, columns))
    total = np.zeros((len(a), len(b)))
    for col in columns:
        if col in numeric:
            x = pd.to_numeric(a[col], errors="coerce").to_numpy(dtype=float)
            y = b[col].to_numpy(dtype=float)
            span = (ranges or {}).get(col)
            if span is None:
                span = float(np.nanmax(y) - np.nanmin(y)) if np.isfinite(y).any() else 0.0
            diff = np.abs(x[:, None] - y[None, :]) / (span if span > 0 else 1.0)
            total += np.where(np.isnan(diff), 1.0, np.minimum(diff, 1.0))
        else:
            x = a[col].astype(object).where(a[col].notna(), None).to_numpy()
            y = b[col].astype(object).where(b[col].notna(), None).to_numpy()
            total += (x[:, None] != y[None, :]).astype(float)
    return total / len(columns)


def closest_distance(a: pd.DataFrame, b: pd.DataFrame, columns: Sequence[str] | None = None,
                     ranges: dict[str, float] | None = None, chunk: int = 512) -> np.ndarray:
    """For each row of a, the Gower distance to its closest row of b (DCR), in chunks of a."""
    if len(b) == 0:
        raise ValueError("closest_distance needs at least one reference row")
    out = [gower_matrix(a.iloc[s : s + chunk], b, columns, ranges).min(axis=1)
           for s in range(0, len(a), chunk)]
    return np.concatenate(out) if out else np.zeros(0)
