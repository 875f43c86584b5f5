"""GReaT row codec: a table row as ``"col is value, col is value, ..."`` and back (arXiv 2210.06280).

Borisov et al. (GReaT, ICLR 2023) write every column of a row, features and target, as
``"<column> is <value>"`` joined by ``", "``, with a fresh random column order for every row the
model sees, so a causal LM learns every conditional and a sample can start from any column. A
sample starts from a prompt ``"<column> is <value>,"`` and the model writes the rest.

What is ours (the paper is silent or looser):

* Column names are shown with underscores as spaces (``age_in_years`` -> ``age in years``), as in
  the classification prompts (`data/text.py`); two columns that would look the same are refused.
* Numbers use `format_number` with `digits` significant digits (default 4: the built-ins carry
  at most 4, so the real rows round-trip exactly); integer-valued columns print as integers.
* `parse` is strict: a row counts only when every column is present once with a value that
  could be real. Numbers must lie in the client's range [min, max] widened by `margin` times
  the range on each side (default 0.1: a little extrapolation, no absurd values); integer
  columns need integers; categories must be seen in the client's rows; the target must be a
  class of the schema. A missing cell is written ``unknown`` and is accepted only in a column
  that has missing cells in the client's rows.
* Values may contain ``", "`` (German Credit's ``"yes, registered under the customers name"``):
  a piece that does not start a new ``"<column> is "`` field continues the previous value
  when the joined text could still become one of that column's known categories (or always,
  for free-text columns).

Everything the codec knows comes from the schema and the client's own rows (`frame`), and is
kept as a JSON-able `spec`, so a saved generator needs no rows to parse again.

>>> import pandas as pd
>>> from fedlora.data.tables import ColumnInfo, Table
>>> frame = pd.DataFrame({"age": [30.0, 50.0], "job": ["cook", "clerk"], "y": ["no", "yes"]})
>>> table = Table("t", frame, "y", [ColumnInfo("age", "numeric"), ColumnInfo("job", "categorical")],
...               ["no", "yes"], "tabular")
>>> codec = GreatCodec(table, frame)
>>> codec.parse("job is cook, y is yes, age is 41")
({'age': 41.0, 'job': 'cook', 'y': 'yes'}, None)
>>> codec.parse("job is cook, y is yes, age is 99")
(None, 'out_of_range')
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

from fedlora.data.tables import Table
from fedlora.data.text import MISSING, format_number

REASONS = ("malformed", "unknown_column", "duplicate_column", "missing_column", "bad_number",
           "out_of_range", "unknown_category")
"""Every reason `parse` can give for refusing a text."""

STARTS = ("target", "random")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_YES, _NO = "yes", "no"


def _display(name: str) -> str:
    return name.replace("_", " ").strip()


class GreatCodec:
    """Serialize, prompt and strictly parse one client's rows in GReaT form (see module doc)."""

    def __init__(self, table: Table, frame: pd.DataFrame, digits: int = 4, margin: float = 0.1,
                 start: str = "target"):
        if frame is None or len(frame) == 0:
            raise ValueError("GreatCodec needs the client's real training rows; got an empty frame "
                             "(give the client at least one row)")
        names = [c.name for c in table.columns] + [table.target]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise ValueError(f"frame lacks the table's column(s) {missing}; pass rows of this table")
        if digits < 1 or margin < 0:
            raise ValueError(f"digits must be >= 1 and margin >= 0, got {digits} and {margin}")
        kinds = [(c.name, c.kind) for c in table.columns] + [(table.target, "target")]
        spec = dict(columns=[[n, _display(n), k] for n, k in kinds], classes=list(table.classes),
                    digits=int(digits), start=start, ranges={}, integer=[], categories={},
                    nullable=[], marginals={})
        for name, kind in kinds:
            values = frame[name]
            if values.isna().any():
                spec["nullable"].append(name)
            present = values.dropna()
            if kind == "numeric" and len(present):
                x = present.to_numpy(dtype=float)
                lo, hi = float(x.min()), float(x.max())
                pad = margin * ((hi - lo) if hi > lo else max(abs(hi), 1.0))
                spec["ranges"][name] = [lo - pad, hi + pad]
                if np.all(np.mod(x, 1) == 0):
                    spec["integer"].append(name)
            elif kind in ("categorical", "text"):
                spec["categories"][name] = sorted({str(v) for v in present})
        self._apply(spec)
        for name, _ in kinds:  # marginals are of the printed values, so a prompt is a real prefix
            counts = Counter(self._format(name, v) for v in frame[name])
            spec["marginals"][name] = sorted([text, int(n)] for text, n in counts.items())

    @classmethod
    def from_spec(cls, spec: dict) -> GreatCodec:
        """Rebuild a codec from `codec.spec` (e.g. read back from a saved generator)."""
        codec = cls.__new__(cls)
        codec._apply(spec)
        return codec

    def _apply(self, spec: dict) -> None:
        if spec["start"] not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {spec['start']!r}")
        self.spec = spec
        self.names = [n for n, _, _ in spec["columns"]]
        self.target = self.names[-1]
        self._text = {n: t for n, t, _ in spec["columns"]}
        self._kind = {n: k for n, _, k in spec["columns"]}
        if len(set(self._text.values())) != len(self.names):
            raise ValueError("two column names look the same once underscores become spaces; "
                             "rename them so GReaT rows can be parsed")
        self._by_text = sorted(((t + " is ", n) for n, t in self._text.items()),
                               key=lambda p: -len(p[0]))  # longest first: 'a b is' before 'b is'
        self._known = {n: set(v) for n, v in spec["categories"].items()}
        self._known[self.target] = set(spec["classes"])
        self._integer = set(spec["integer"])

    # ------------------------------------------------------------------------------ writing

    def _format(self, name: str, value) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return MISSING
        kind = self._kind[name]
        if kind == "boolean":
            return _YES if bool(value) else _NO
        if kind == "numeric":
            return format_number(value, self.spec["digits"], name in self._integer)
        return str(value)

    def serialize(self, row, rng: np.random.Generator) -> str:
        """One row (a Series or mapping over the table's columns), columns in a fresh random order."""
        order = rng.permutation(len(self.names))
        return ", ".join(f"{self._text[self.names[i]]} is {self._format(self.names[i], row[self.names[i]])}"
                         for i in order)

    def prompt(self, rng: np.random.Generator) -> str:
        """``"<col> is <value>,"``: the target (or a random column) with a value from the client's marginal."""
        name = self.target if self.spec["start"] == "target" else self.names[rng.integers(len(self.names))]
        texts, counts = zip(*self.spec["marginals"][name])
        p = np.asarray(counts, dtype=float)
        return f"{self._text[name]} is {texts[rng.choice(len(texts), p=p / p.sum())]},"

    # ------------------------------------------------------------------------------ reading

    def parse(self, text: str) -> tuple[dict | None, str | None]:
        """(row, None) with the table's value types, or (None, reason) with a code from `REASONS`.

        Checks in order: the split into fields (malformed / unknown_column / duplicate_column),
        missing_column, then each column's value in table order (first failure wins).
        """
        row, reason, _ = self._parse(text)
        return row, reason

    def valid_fraction(self, text: str) -> float:
        """Share of the columns present with an acceptable value (partial credit for a reward)."""
        return self._parse(text)[2]

    def _parse(self, text: str) -> tuple[dict | None, str | None, float]:
        fields, reason = self._fields(text)
        values, first_bad = {}, None
        for name in self.names:
            if name not in fields:
                continue
            value, bad = self._value(name, fields[name])
            if bad is None:
                values[name] = value
            elif first_bad is None:
                first_bad = bad
        share = len(values) / len(self.names)
        if reason is None and len(fields) < len(self.names):
            reason = "missing_column"
        reason = reason or first_bad
        if reason is not None:
            return None, reason, share
        return {n: values[n] for n in self.names}, None, 1.0

    def _fields(self, text: str) -> tuple[dict[str, str], str | None]:
        fields: dict[str, str] = {}
        current = None
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            return fields, "malformed"
        for piece in text.split(", "):
            name = next((n for head, n in self._by_text if piece.startswith(head)), None)
            if name is not None:
                if name in fields:
                    return fields, "duplicate_column"
                fields[name] = piece[len(self._text[name]) + 4:]
                current = name
            elif current is not None and self._continues(current, f"{fields[current]}, {piece}"):
                fields[current] = f"{fields[current]}, {piece}"
            else:
                return fields, "unknown_column" if " is " in piece else "malformed"
        return fields, None

    def _continues(self, name: str, joined: str) -> bool:
        if self._kind[name] == "text":
            return True
        return any(c.startswith(joined) for c in self._known.get(name, ()))

    def _value(self, name: str, text: str):
        """(value, None) or (None, reason) for one column's printed value."""
        kind = self._kind[name]
        if text == MISSING and name in self.spec["nullable"] and text not in self._known.get(name, ()):
            return (np.nan if kind == "numeric" else None), None
        if kind == "numeric":
            if not _NUMBER.fullmatch(text) or not np.isfinite(value := float(text)):
                return None, "bad_number"
            if name in self._integer and value != int(value):
                return None, "bad_number"
            lo, hi = self.spec["ranges"].get(name, (np.inf, -np.inf))  # no real value: nothing fits
            return (value, None) if lo <= value <= hi else (None, "out_of_range")
        if kind == "boolean":
            return ({_YES: True, _NO: False}[text], None) if text in (_YES, _NO) else (None, "unknown_category")
        if kind == "text":
            return (text, None) if text else (None, "unknown_category")
        return (text, None) if text in self._known[name] else (None, "unknown_category")

    def to_frame(self, rows: list[dict]) -> pd.DataFrame:
        """Parsed rows as a DataFrame with the table's column order and dtypes (float64, boolean, object)."""
        frame = pd.DataFrame(list(rows), columns=self.names)
        for name in self.names:
            kind = self._kind[name]
            dtype = {"numeric": "float64", "boolean": "boolean"}.get(kind, object)
            frame[name] = frame[name].astype(dtype)
        return frame
