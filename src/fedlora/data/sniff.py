"""Checks on a data file before and after it is parsed: what the file really is, and whether it was cut off.

- `check_file`: a directory given as `data.source` is refused by name (no `IsADirectoryError`).
- `sniff_binary`: a Parquet, gzip, zip, Excel or other binary file given under a text name (`.csv`,
  `.jsonl`) is named by its magic bytes, with how to load it, instead of "not valid UTF-8".
- `sniff_delimiter`: a `;`, tab or `|` separated file is recognised from its first lines.
- `check_last_row`: a CSV whose last line has no trailing newline and whose target there is a
  class seen nowhere else was probably truncated mid-row (`...,22,N` with classes `NO`/`YES`):
  refused when that value is the beginning of a real class, warned about otherwise.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pandas as pd

from fedlora.data.schema import DataError, _label_text

_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def check_file(path: Path) -> None:
    """Refuse a directory (or any non-file) as `data.source`, naming it."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; data.source must be one .csv, .parquet or .jsonl "
                        f"file inside it (or a built-in name), e.g. --data {path / 'rows.csv'}")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; data.source must be a .csv, .parquet or .jsonl file")


def sniff_binary(path: Path, raw: bytes) -> None:
    """Raise a DataError saying what a binary file is and how to load it; return for text."""
    head = raw[:8]
    if head.startswith(b"PAR1"):
        kind, fix = "a Parquet file", f"rename it to {path.with_suffix('.parquet').name} (fedlora reads .parquet)"
    elif head.startswith(b"\x1f\x8b"):
        kind, fix = "gzip-compressed", f"decompress it first (gunzip {path.name}) and pass the .csv inside"
    elif head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if b"[Content_Types].xml" in raw[:4096] or b"xl/" in raw[:65536]:
            kind, fix = "an Excel workbook (.xlsx)", "save the sheet as 'CSV UTF-8' in the spreadsheet program"
        else:
            kind, fix = "a zip archive", "extract it and pass the .csv inside"
    elif head.startswith(b"\xd0\xcf\x11\xe0"):
        kind, fix = "a legacy Excel/Office file (.xls)", "save the sheet as 'CSV UTF-8' in the spreadsheet program"
    elif b"\x00" in raw[:4096] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind, fix = "a binary file (it holds NUL bytes)", "export the table as CSV (UTF-8)"
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind, fix = "UTF-16 text", "re-save it as UTF-8 (e.g. in a spreadsheet: 'CSV UTF-8')"
    else:
        return
    raise DataError(f"{path}: this is {kind}, not {path.suffix or 'text'} text; {fix}")


def sniff_delimiter(text: str) -> str:
    """The delimiter of a CSV from its first lines: ',' unless ';', tab or '|' clearly splits the header."""
    lines = [line for line in text.splitlines()[:20] if line.strip()]
    if not lines or "," in lines[0] and not any(d in lines[0] for d in ";\t|"):
        return ","
    try:
        found = csv.Sniffer().sniff("\n".join(lines), delimiters="".join(_DELIMITERS)).delimiter
    except csv.Error:  # no consistent delimiter: fall back on the header's most frequent one
        counts = {d: lines[0].count(d) for d in _DELIMITERS}
        found = max(counts, key=counts.get) if max(counts.values()) else ","
    return found if found in _DELIMITERS else ","


def delimiter_name(sep: str) -> str:
    return _DELIMITERS.get(sep, repr(sep))


def check_last_row(raw: pd.DataFrame, target: str, path: Path, text: str) -> None:
    """Refuse (or warn about) a final line without newline whose target is a one-off new class."""
    if not text or text.endswith(("\n", "\r")) or target not in raw.columns or len(raw) < 3:
        return
    labels = raw[target].map(_label_text)
    last = labels.iloc[-1]
    counts = labels.iloc[:-1].value_counts()
    if last is None or last in counts.index or counts.empty or int(counts.min()) < 2:
        return  # a known class, or a table of one-off classes where a new one is not unusual
    others = sorted({v for v in labels.iloc[:-1] if v is not None})
    row, line = len(raw), text.count("\n") + 1
    where = (f"{path}: row {row} (line {line}, the last; it has no trailing newline) has target "
             f"{target!r} = {last!r}, a class found in no other row")
    prefix_of = [c for c in others if len(c) > len(last) and c.lower().startswith(last.lower())]
    if prefix_of:
        raise DataError(f"{where}, and the beginning of {prefix_of[0]!r}: the file looks truncated "
                        "(cut off mid-row); re-export or re-download it, or delete that last line")
    warnings.warn(f"{where}; if the file was cut off, re-export it - otherwise end the file with a "
                  "newline to silence this warning", stacklevel=4)
