"""Concordia level 2 (arXiv 2605.09855): synthetic rows as the model and the utility scorers see them.

- `encode_rows`: any rows with table.frame's columns (real or synthetic) to the prompt encodings of
  local training, exactly as the federation encodes its clients' splits (it lives in
  `fedlora.train.encode`, below both, and is re-exported here);
- `row_labels`: each row's class index, with a clear error for a label outside `table.classes`
  (also from `fedlora.train.encode`);
- `RowFeaturizer`: one fixed schema feature vector per row, identical on every client, the input of
  the per-client utility scorer (`synth/scorer.py`).

The paper's body is not available (research note, section 3, marked [A]): the schema features and
the data dictionary they are built from are our (D) design choices, documented in `RowFeaturizer`.

>>> from fedlora.data.tables import ColumnInfo
>>> frame = pd.DataFrame({"age": [20.0, 60.0], "label": ["no", "yes"]})
>>> table = Table("toy", frame, "label", [ColumnInfo("age", "numeric")], ["no", "yes"], "tabular")
>>> RowFeaturizer(table).transform(frame).tolist()   # age, age=<missing>, label=no, label=yes
[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fedlora.data.schema import _FALSE, _TRUE, Table
from fedlora.train.encode import _check_rows, encode_rows, row_labels  # noqa: F401  (encode_rows: re-exported)


# ----------------------------------------------------------------------------------- features


class RowFeaturizer:
    """One fixed feature vector per row, identical on every client (scorers are applied across clients).

    Built from the schema only, never from the rows being transformed:
    - numeric column: (x - lo) / (hi - lo) clipped to [-1, 2], plus a missing flag (value 0 then);
    - categorical / boolean: one-hot over the schema's categories ([no, yes] for boolean) plus one
      'other/missing' slot;
    - target: one-hot over `table.classes` (a row with another label is an error);
    - text columns: skipped (free text has no schema features).
    lo / hi and the categories default to table.frame's (D): we treat the table's column ranges and
    categories as the public data dictionary all clients agree on. In the simulation table.frame is
    the whole table; a deployment passes the published dictionary as `ranges` / `categories`.
    The clip keeps a wild synthetic value (1e9) from dominating the MLP while still marking it as
    out of range.
    """

    def __init__(self, table: Table, ranges: Mapping[str, tuple[float, float]] | None = None,
                 categories: Mapping[str, Sequence[str]] | None = None):
        self.table = table
        self._blocks: list[tuple[str, str, object]] = []
        self.names: list[str] = []
        for col in table.columns:
            if col.kind == "numeric":
                lo, hi = (ranges or {}).get(col.name) or _range(table.frame[col.name])
                self._blocks.append((col.name, "numeric", (float(lo), float(hi))))
                self.names += [col.name, f"{col.name}=<missing>"]
            elif col.kind in ("categorical", "boolean"):
                if col.kind == "boolean":
                    cats = ["no", "yes"]
                else:
                    given = (categories or {}).get(col.name)
                    cats = list(given) if given is not None else sorted(
                        {str(v).strip() for v in table.frame[col.name].dropna()})
                self._blocks.append((col.name, col.kind, cats))
                self.names += [f"{col.name}={c}" for c in cats] + [f"{col.name}=<other/missing>"]
        self.names += [f"{table.target}={c}" for c in table.classes]

    @property
    def dim(self) -> int:
        return len(self.names)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """(len(frame), dim) float32; row i depends on row i only."""
        _check_rows(self.table, frame, "RowFeaturizer.transform")
        parts = []
        for name, kind, spec in self._blocks:
            values = frame[name]
            if kind == "numeric":
                lo, hi = spec
                x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
                missing = np.isnan(x)
                scaled = np.clip((x - lo) / (hi - lo if hi > lo else 1.0), -1.0, 2.0)
                parts += [np.where(missing, 0.0, scaled), missing.astype(np.float64)]
            else:
                tokens = values.map(_bool_token if kind == "boolean" else _category_token)
                parts += _one_hot(tokens.to_numpy(dtype=object), spec, other=True)
        parts += _one_hot(row_labels(self.table, frame), range(len(self.table.classes)), other=False)
        return np.stack(parts, axis=1).astype(np.float32)


def _range(series: pd.Series) -> tuple[float, float]:
    values = series.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)


def _category_token(value) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()


def _bool_token(value) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    text = str(value).strip().lower()
    return "yes" if text in _TRUE else "no" if text in _FALSE else None


def _one_hot(tokens: np.ndarray, vocab, other: bool) -> list[np.ndarray]:
    vocab = list(vocab)
    cols = [(tokens == v).astype(np.float64) for v in vocab]
    if other:
        cols.append(1.0 - np.sum(cols, axis=0) if cols else np.ones(len(tokens)))
    return cols
