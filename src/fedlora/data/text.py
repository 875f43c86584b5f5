"""Turn table rows into classification prompts (TabLLM style) and classes into verbalizers.

A row becomes ``"mean radius is 18. mean texture is 10.4. ..."``, then a question that names the
options, then ``"Answer:"``. The model is scored on the log-likelihood of each verbalizer
(``" benign"``, ``" malignant"``) appended to the prompt, so no free-form generation is needed and
the options in the question give a zero-shot model a fair chance.

Numbers are printed with a fixed number of significant digits ("digits") or as words such as
"low" / "high" ("quantile"). Quantile edges are learned by :meth:`RowSerializer.fit` from one
client's training rows only: learning them from all rows would leak other clients' data and the
test rows into the prompt format.

>>> from fedlora.config import DataConfig
>>> from fedlora.data.tables import load_table
>>> table = load_table(DataConfig(source="breast-cancer", columns=["mean radius"]))
>>> RowSerializer(table, DataConfig(digits=3)).prompt(table.frame.iloc[0])
'mean radius is 18.\\nQuestion: what is the diagnosis? Options: benign, malignant.\\nAnswer:'
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from fedlora.config import DataConfig
from fedlora.data.tables import DataError, Table

MISSING = "unknown"
"""Printed for a missing feature value: keeps every prompt's structure the same and lets the model
see missingness, which is often informative (e.g. an unreported savings account)."""

_WORDS = {
    2: ["low", "high"],
    3: ["low", "medium", "high"],
    4: ["very low", "low", "high", "very high"],
    5: ["very low", "low", "medium", "high", "very high"],
    6: ["very low", "low", "medium low", "medium high", "high", "very high"],
    7: ["very low", "low", "medium low", "medium", "medium high", "high", "very high"],
}


def bin_words(bins: int) -> list[str]:
    """Words for `bins` ordered quantile bins; beyond 7 there are no natural words, so numbered."""
    if bins < 2:
        raise DataError(f"data.quantile_bins must be >= 2, got {bins}")
    return _WORDS.get(bins) or [f"band {i + 1} of {bins}" for i in range(bins)]


def format_number(value: float, digits: int, integer: bool = False) -> str:
    """`digits` significant digits, positional for ordinary magnitudes (no '1.17e+03' tokens).

    Integer-valued columns (ages, counts, amounts, years) print exactly: rounding 1995 to '2e+03'
    or 1169 to '1170' would destroy meaning and saves no tokens.
    """
    value = float(value)
    if value == 0:
        return "0"
    if integer and abs(value) < 1e15:
        return str(int(value))
    if 1e-4 <= abs(value) < 1e15:
        return np.format_float_positional(value, precision=digits, unique=False,
                                          fractional=False, trim="-")
    return f"{value:.{digits}g}"


def _display(name: str) -> str:
    return name.replace("_", " ").strip()


class RowSerializer:
    """TabLLM-style: 'mean radius is 18. mean texture is 10.4. ...', a question, 'Answer:'."""

    def __init__(self, table: Table, cfg: DataConfig):
        self.table = table
        self.cfg = cfg
        if cfg.number_format not in ("digits", "quantile"):
            raise DataError(f"data.number_format must be 'digits' or 'quantile', "
                            f"got {cfg.number_format!r}")
        if cfg.number_format == "quantile":
            self._words = bin_words(cfg.quantile_bins)
        self._verbalizers = [" " + _display(c) for c in table.classes]
        if len(set(self._verbalizers)) != len(self._verbalizers):
            raise DataError(f"class names of {table.target!r} collide once underscores become "
                            f"spaces ({table.classes}); rename the classes so they differ")
        numeric = [c.name for c in table.columns if c.kind == "numeric"]
        # Integer-valued is a schema fact (like the column kind), not a statistic learned from rows.
        self._integer = {
            name for name in numeric
            if np.all(np.mod(table.frame[name].dropna().to_numpy(dtype=float), 1) == 0)
        }
        self._edges: dict[str, np.ndarray] | None = None  # sorted fitted values per column
        options = ", ".join(v.strip() for v in self._verbalizers)
        self._question = f"Question: what is the {_display(table.target)}? Options: {options}."

    def fit(self, frame: pd.DataFrame) -> RowSerializer:
        """A new serializer whose quantile bins come from `frame` (a client's training rows).

        A numeric column with no values in `frame` falls back to significant digits.
        """
        fitted = copy.copy(self)
        if self.cfg.number_format != "quantile":
            return fitted
        fitted._edges = {}
        for col in self.table.columns:
            if col.kind != "numeric":
                continue
            values = np.sort(frame[col.name].dropna().to_numpy(dtype=float))
            if len(values):
                fitted._edges[col.name] = values
        return fitted

    def _bin(self, name: str, value: float) -> str:
        """Word for the mid-rank percentile of `value` among the fitted rows.

        Mid-rank (share below plus half the share equal) rather than fixed quantile edges: with
        a 0/1-like column where 85% of rows are 1, edges all collapse onto 1 and a plain edge
        lookup would call the most common value 'very high'; mid-rank calls it 'medium'.
        """
        seen = self._edges[name]
        lo, hi = np.searchsorted(seen, value, "left"), np.searchsorted(seen, value, "right")
        k = len(self._words)
        return self._words[min(int((lo + hi) / 2 / len(seen) * k), k - 1)]

    @property
    def verbalizers(self) -> list[str]:
        """One answer string per class, in `table.classes` order, each with a leading space."""
        return list(self._verbalizers)

    def _value(self, name: str, kind: str, value) -> str:
        if value is None or pd.isna(value):
            return MISSING
        if kind == "boolean":
            return "yes" if bool(value) else "no"
        if kind != "numeric":
            return str(value)
        if self._edges is not None and name in self._edges:
            return self._bin(name, float(value))
        return format_number(value, self.cfg.digits, name in self._integer)

    def features(self, row: pd.Series) -> str:
        """The feature part of a prompt (for text tables, the text itself)."""
        if self.table.kind == "text":
            return str(row[self.table.columns[0].name]).strip()
        return " ".join(
            f"{_display(c.name)} is {self._value(c.name, c.kind, row[c.name])}."
            for c in self.table.columns
        )

    def prompt(self, row: pd.Series) -> str:
        """Features, the question with its options, and 'Answer:' (no trailing space)."""
        if self.cfg.number_format == "quantile" and self._edges is None:
            raise RuntimeError("number_format='quantile' needs bins: call "
                               "serializer = serializer.fit(train_frame) first")
        return f"{self.features(row)}\n{self._question}\nAnswer:"

    def content_free_prompt(self, token: str) -> str:
        """The prompt of a row whose every value is `token` (e.g. 'N/A'); for a text table, the text
        `token`. Same question and 'Answer:' as `prompt`, no fitted bins needed: the content-free
        inputs of contextual calibration (arXiv 2101.09690, train/calibration.py)."""
        if self.table.kind == "text":
            features = token
        else:
            features = " ".join(f"{_display(c.name)} is {token}." for c in self.table.columns)
        return f"{features}\n{self._question}\nAnswer:"

    def prompts(self, frame: pd.DataFrame) -> list[str]:
        return [self.prompt(row) for _, row in frame.iterrows()]
