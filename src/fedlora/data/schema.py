"""What a clean table is, and how raw rows become one: `Table`, `ColumnInfo`, kind inference, cleaning.

`_clean` is the one path every source takes after reading (`tables.load_table`): pick the target
and feature columns, drop rows without a label, optionally subsample (seeded, stratified), infer
a kind per feature column ('numeric', 'categorical', 'boolean' or 'text'), give each kind one
representation and group rare categories. Problems raise :class:`DataError` naming the column
and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from sklearn.model_selection import train_test_split

from fedlora.config import DataConfig

MAX_CLASSES = 20
"""A verbalizer is one short answer per class; beyond this, likelihood scoring gets unreliable."""

_TRUE = {"true", "yes", "1", "t", "y", "1.0"}
_FALSE = {"false", "no", "0", "f", "n", "0.0"}


class DataError(ValueError):
    """The data cannot be used as given; the message names the file/column/row and the fix."""


@dataclass
class ColumnInfo:
    name: str
    kind: str
    """'numeric', 'categorical', 'boolean' or 'text'."""
    description: str | None = None


@dataclass(eq=False)  # a DataFrame has no boolean equality, so neither can a Table
class Table:
    name: str
    frame: pd.DataFrame
    """Feature columns in `columns` order, then the target (class names as strings); RangeIndex."""
    target: str
    columns: list[ColumnInfo]
    classes: list[str]
    kind: str
    domain: str = ""
    source: str = ""
    license: str = ""

    @property
    def labels(self) -> np.ndarray:
        """Each row's class index into `classes` (int64), as partitioning and metrics want."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return self.frame[self.target].map(lookup).to_numpy(dtype=np.int64)


# ------------------------------------------------------------------------------ schema + clean

def _label_text(value) -> str | None:
    """Class names are strings; 1.0 read from a CSV with gaps becomes '1', not '1.0'."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _sort_classes(values) -> list[str]:
    """Numeric class names sort as numbers ('2' before '10'); the rest alphabetically."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def infer_kind(series: pd.Series) -> str:
    """'boolean', 'numeric' or 'categorical' from the non-missing values (see docs/data.md)."""
    values = series.dropna()
    if ptypes.is_bool_dtype(series.dtype):
        return "boolean"
    tokens = {str(v).strip().lower() for v in values}
    if len(tokens) <= 2 and tokens <= (_TRUE | _FALSE):
        return "boolean"
    if ptypes.is_numeric_dtype(series.dtype):
        return "numeric"
    if pd.to_numeric(values.astype(str).str.strip(), errors="coerce").notna().all():
        return "numeric"
    return "categorical"


def _convert(series: pd.Series, kind: str, rare: float) -> pd.Series:
    """Give each kind one representation: float64, nullable boolean, or object strings/None."""
    if kind == "numeric":
        if not ptypes.is_numeric_dtype(series.dtype):
            series = series.map(lambda v: None if pd.isna(v) else str(v).strip())
        return pd.to_numeric(series, errors="coerce").astype("float64")
    if kind == "boolean":
        tokens = series.map(lambda v: None if pd.isna(v) else str(v).strip().lower() in _TRUE)
        return tokens.astype("boolean")
    out = series.map(lambda v: None if pd.isna(v) else str(v).strip()).astype(object)
    if kind == "categorical" and rare > 0:
        shares = out.value_counts(dropna=True) / len(out)
        rare_values = set(shares.index[shares < rare])
        out = out.map(lambda v: "other" if v in rare_values else v).astype(object)
    return out


def _subsample(frame: pd.DataFrame, target: str, max_rows: int | None, seed: int) -> pd.DataFrame:
    """Seeded stratified sample; falls back to a plain seeded sample when a class is too small."""
    if max_rows is None or max_rows >= len(frame):
        return frame
    if max_rows < 1:
        raise DataError(f"data.max_rows must be >= 1, got {max_rows}")
    positions = np.arange(len(frame))
    y = frame[target].to_numpy()
    try:
        keep, _ = train_test_split(positions, train_size=max_rows, stratify=y, random_state=seed)
    except ValueError:  # a class with one row, or fewer rows wanted than classes
        keep = np.random.default_rng(seed).choice(positions, size=max_rows, replace=False)
    return frame.iloc[np.sort(keep)]


def _clean(raw: pd.DataFrame, cfg: DataConfig, where: str, target: str, seed: int,
           text_kind: bool) -> tuple[pd.DataFrame, list[ColumnInfo], list[str]]:
    available = [str(c) for c in raw.columns]
    if target not in available:
        raise DataError(f"{where}: target column {target!r} not found; available columns: "
                        f"{', '.join(available)}. Set data.target (--target) to one of them")
    features = [c for c in dict.fromkeys(cfg.columns or available) if c != target]
    unknown = [c for c in features if c not in available]
    if unknown:
        raise DataError(f"{where}: data.columns names unknown column(s) {unknown}; available "
                        f"columns: {', '.join(available)}")
    if not features:
        raise DataError(f"{where}: no feature columns left besides the target {target!r}")
    frame = raw[features + [target]].copy()
    frame[target] = frame[target].map(_label_text).astype(object)
    missing = int(frame[target].isna().sum())
    if missing:
        warnings.warn(f"{where}: dropped {missing} row(s) with a missing target {target!r}",
                      stacklevel=3)
        frame = frame[frame[target].notna()]
    if frame.empty:
        raise DataError(f"{where}: no rows with a value in target column {target!r}")
    classes = _sort_classes(frame[target])
    if len(classes) < 2:
        raise DataError(f"{where}: target {target!r} has only one class ({classes[0]!r}); a "
                        "classifier needs at least two - check the target column")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{where}: target {target!r} has {len(classes)} classes; the verbalizer "
                        f"can express at most {MAX_CLASSES} classes - group them or pick another "
                        "target")
    frame = _subsample(frame.reset_index(drop=True), target, cfg.max_rows, seed)
    columns = []
    for name in features:
        if frame[name].isna().all():
            raise DataError(f"{where}: column {name!r} is entirely empty; drop it by listing the "
                            "columns to keep in data.columns")
        kind = "text" if text_kind else infer_kind(frame[name])
        frame[name] = _convert(frame[name], kind, cfg.max_rare_fraction)
        infinite = int(np.isinf(frame[name].to_numpy()).sum()) if kind == "numeric" else 0
        if infinite:  # 'inf' or 1e400: no baseline, scaler or quantile can use it
            raise DataError(f"{where}: numeric column {name!r} holds {infinite} infinite value(s) ('inf' or "
                            "a number beyond float64 such as 1e400); fix them or leave those cells empty")
        columns.append(ColumnInfo(name, kind))
    # classes come from all labelled rows, so a subsample that misses a rare class keeps its name
    return frame.reset_index(drop=True), columns, classes
