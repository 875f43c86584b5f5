"""Generation records (prompt -> free-form response) from JSONL or CSV, checked line by line.

`data.task=generation` reads one record per JSONL line (or CSV row) with a prompt and a reference
response (field names `data.prompt_field`, `data.response_field`), an optional system message
(`data.system_field`), or instead a chat (`data.messages_field`: a list of {role, content} whose
last turn is the assistant's answer). Other scalar fields are kept as categorical columns, so a
field such as `task` can group records (`data.target`: stratification and Dirichlet skew) or
define clients (`partition.column`).

What is refused and what is dropped (docs/data.md):
- errors naming the line: not valid UTF-8, not valid JSON, not an object, the prompt or
  response field missing or not text, an empty prompt, a malformed chat, no records at all;
- dropped with one counted warning: records whose response is empty or blank (an export gap
  more often than an answer; training on it would teach the model to stop at once).

The result is a `Table` of kind 'generation': columns `prompt` and `response` (text), the kept
scalar fields, the group column (the target), and `_chat` (the turns before the response, system
first) and `_line` (the source line, for error messages) used by the encoder.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import pandas as pd

from fedlora.config import DataConfig
from fedlora.data.schema import (
    ColumnInfo,
    DataError,
    Table,
    _label_text,
    _sort_classes,
    _subsample,
)
from fedlora.data.sniff import check_file, sniff_binary

GROUP = "_group"
"""The target column when data.target names no field: every record in one group 'all'."""
ROLES = ("system", "user", "assistant")


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines as text; a line that is not UTF-8 is an error naming it (not a byte offset)."""
    raw = path.read_bytes()
    sniff_binary(path, raw)  # a Parquet, gzip or Excel file named .jsonl says what it is
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; add one record per line")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid UTF-8 (byte 0x{chunk[exc.start]:02x} at column "
                            f"{exc.start + 1}); re-save the file as UTF-8 (spreadsheet: 'CSV UTF-8')") from None
    return lines


def _jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    out = []
    for number, line in enumerate(_decoded_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')}); "
                            'each line must be one object like {"prompt": "...", "response": "..."}') from None
        if not isinstance(obj, dict):
            raise DataError(f'{path}, line {number}: a JSON {type(obj).__name__}, not an object; each line must '
                            'be one object like {"prompt": "...", "response": "..."}')
        out.append((number, obj))
    return out


def _csv_objects(path: Path) -> list[tuple[int, dict]]:
    """Rows as dicts with the physical line each starts on (quoted cells may span lines)."""
    reader = csv.DictReader(io.StringIO("\n".join(_decoded_lines(path))))
    out, start = [], 2
    for row in reader:
        if None in row:
            raise DataError(f"{path}, line {start}: more cells than the header has columns; quote cells that "
                            "contain commas")
        if any(v is not None and v.strip() for v in row.values()):
            out.append((start, {k: v for k, v in row.items() if v is not None}))
        start = reader.line_num + 1
    return out


def _chat(where: str, value, field: str) -> tuple[list[dict], str]:
    """(turns before the answer, the answer) of a chat field; a CSV cell may hold the list as JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f'{where}: "{field}" is text that is not a JSON list of messages') from None
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise DataError(f'{where}: "{field}" must be a list of {{"role": "system"|"user"|"assistant", '
                        '"content": "..."}} messages')
    if value[-1]["role"] != "assistant":
        raise DataError(f'{where}: the last message of "{field}" must be the assistant\'s answer (the response '
                        f"to learn), not a {value[-1]['role']!r} turn")
    turns = [{"role": m["role"], "content": m["content"]} for m in value[:-1]]
    if not any(t["role"] == "user" and t["content"].strip() for t in turns):
        raise DataError(f'{where}: "{field}" has no non-empty user message before the answer')
    return turns, value[-1]["content"]


def _text(where: str, obj: dict, field: str, required: bool) -> str | None:
    value = obj.get(field)
    if value is None or (not required and value == ""):
        if required:
            raise DataError(f'{where}: no "{field}" field; every record needs a prompt and a response (set '
                            f"data.prompt_field / data.response_field if your file names them otherwise, e.g. "
                            f"--set data.prompt_field=instruction), or a chat in data.messages_field")
        return None
    if not isinstance(value, str):
        raise DataError(f'{where}: "{field}" must be text, got a JSON {type(value).__name__}; quote it')
    return value


def _record(where: str, obj: dict, cfg: DataConfig) -> dict:
    """One record as {_chat, prompt, response, extras...}; errors name the line."""
    if cfg.messages_field in obj and obj[cfg.messages_field] not in (None, ""):
        turns, response = _chat(where, obj[cfg.messages_field], cfg.messages_field)
    else:
        prompt = _text(where, obj, cfg.prompt_field, True)
        response = _text(where, obj, cfg.response_field, True)
        if not prompt.strip():
            raise DataError(f'{where}: "{cfg.prompt_field}" is empty; write the instruction or question there')
        system = _text(where, obj, cfg.system_field, False)
        turns = ([{"role": "system", "content": system}] if system and system.strip() else [])
        turns.append({"role": "user", "content": prompt})
    used = {cfg.prompt_field, cfg.response_field, cfg.system_field, cfg.messages_field}
    extras = {k: v for k, v in obj.items()
              if k not in used and not k.startswith("_") and isinstance(v, (str, int, float, bool))}
    user = [t["content"] for t in turns if t["role"] == "user"][-1]
    return {"_chat": turns, "prompt": user, "response": response, **extras}


def read_records(path: Path, cfg: DataConfig) -> pd.DataFrame:
    """Every usable record of a JSONL or CSV file, in file order, with its `_line`."""
    check_file(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: data.task=generation reads .jsonl or .csv files, not {suffix or '(none)'!r}")
    objects = _jsonl_objects(path) if suffix == ".jsonl" else _csv_objects(path)
    records, blank = [], []
    for number, obj in objects:
        rec = _record(f"{path}, line {number}", obj, cfg)
        if not rec["response"].strip():
            blank.append(number)
            continue
        records.append({**rec, "_line": number})
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        warnings.warn(f"{path}: dropped {len(blank)} record(s) with an empty response (line {shown}); fill "
                      "them in to train on them", stacklevel=3)
    if not records:
        raise DataError(f"{path}: no records with a response; add one object per line like "
                        '{"prompt": "...", "response": "..."}')
    return pd.DataFrame(records)


def generation_table(frame: pd.DataFrame, cfg: DataConfig, name: str, seed: int, source: str = "",
                     license: str = "", domain: str = "", target: str | None = None) -> Table:
    """Records (as `read_records` gives them) as a Table of kind 'generation'."""
    target = cfg.target or target
    if target is None:
        target = GROUP
        frame = frame.assign(**{GROUP: "all"})
    elif target not in frame.columns or frame[target].isna().any():
        rows = frame["_line"][frame[target].isna()] if target in frame.columns else frame["_line"]
        raise DataError(f"{name}: data.target {target!r} groups records but is missing on line "
                        f"{int(rows.iloc[0])}; give every record that field, or unset data.target")
    frame = frame.assign(**{target: frame[target].map(_label_text)})
    frame = _subsample(frame.reset_index(drop=True), target, cfg.max_rows, seed).reset_index(drop=True)
    extras = [c for c in frame.columns if c not in ("_chat", "prompt", "response", "_line", target)]
    columns = [ColumnInfo("prompt", "text"), ColumnInfo("response", "text")]
    columns += [ColumnInfo(c, "categorical") for c in extras]
    order = ["prompt", "response", *extras, target, "_chat", "_line"]
    classes = _sort_classes(frame[target].unique())
    return Table(name, frame[order], target, columns, classes, "generation", domain, source, license)


def load_generation_table(cfg: DataConfig, seed: int = 0) -> Table:
    """`data.source` as generation records: a derived built-in (data/derived.py) or a file."""
    from fedlora.data.derived import DERIVED, derived_key

    key = derived_key(cfg.source)
    if key is not None:
        meta = DERIVED[key]
        return generation_table(meta["records"](), cfg, key, seed, meta["source"], meta["license"],
                                meta["domain"], meta["target"])
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data file {cfg.source!r} not found; with data.task=generation give a .jsonl or .csv "
                        f"of prompt/response records, or a built-in generation task ({', '.join(DERIVED)})")
    return generation_table(read_records(path, cfg), cfg, path.stem, seed, source=str(path))
