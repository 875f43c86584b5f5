"""Atomic per-round checkpoints: tensors in safetensors, everything else in JSON, SHA-256 checked.

A checkpoint is a folder `checkpoints/round-0003/` holding

    state.safetensors   every tensor of the run state, under keys t0, t1, ...
    state.json          the state's skeleton (nested dicts, lists, numbers, strings) in which each
                        tensor appears as {"__tensor__": "t7"}, plus the metric rows so far and
                        what the run was (method, seed, config)
    manifest.json       round, format version, and the SHA-256 and size of the two files above

It is written into `checkpoints/.tmp-round-0003/`, every file and the folder are fsync'ed, and the
folder is renamed into place (`os.replace`), so a crash leaves either the whole checkpoint or none;
a leftover `.tmp-*` folder is ignored and removed by the next save. The newest `keep` are kept.

Loading verifies both checksums; a checkpoint that is truncated, corrupted or incomplete is
skipped with a warning naming the problem, and the previous good one is used.

The state is serialized generically: any nesting of dicts (string or integer keys), lists,
tuples, tensors, numpy arrays, numbers, strings, None and fedlora dataclasses round-trips
exactly (an AdamW state_dict with integer parameter ids and tuple betas comes back equal), so a
field added to `RunState` later is saved with no change here. Nothing is read back through a
format that can run code: tensors come only from safetensors, the rest only from JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedlora.config import RunConfig
from fedlora.jsonio import tag_nonfinite, untag_nonfinite

log = logging.getLogger("fedlora")

FORMAT = 1
_DIR = re.compile(r"^round-(\d{4,})$")
_FILES = ("state.safetensors", "state.json")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not belong to this run; the message says which."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the run state's fields, the metric rows so far, and who wrote it."""

    round: int
    fields: dict[str, Any]
    rows: list[dict]
    info: dict[str, Any]
    """method, seed and config (a dict) of the run that wrote it."""
    path: Path


# --- generic state <-> (tensors, JSON skeleton) -----------------------------------------------------

def flatten(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """The JSON skeleton of `value`; its tensors are added to `tensors` (copied, contiguous, CPU)."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy: safetensors refuses tensors that share storage, and the run keeps mutating its own.
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: flatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError(f"checkpoint: {where} has a dict key that is neither str nor int; "
                            "use str or int keys in run state")
        return {"__dict__": [[k, flatten(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("fedlora."):
            raise TypeError(f"checkpoint: {where} is a {cls.__module__}.{cls.__qualname__}; only fedlora "
                            "dataclasses can be saved (convert it to dicts and tensors)")
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: flatten(getattr(value, f.name), tensors, f"{where}.{f.name}")
                           for f in dataclasses.fields(value)}}
    raise TypeError(f"checkpoint: cannot save {where} of type {type(value).__name__}; run state may hold "
                    "only tensors, numpy arrays, numbers, strings, None, and lists/tuples/dicts of them")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return tensors[skeleton["__ndarray__"]].numpy()
    if "__tuple__" in skeleton:
        return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
    if "__dict__" in skeleton:
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if "__dataclass__" in skeleton:
        module, _, qualname = skeleton["__dataclass__"].partition(":")
        if not module.startswith("fedlora."):
            raise CheckpointError(f"checkpoint names a class outside fedlora: {skeleton['__dataclass__']}")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not dataclasses.is_dataclass(cls):
            raise CheckpointError(f"checkpoint names {skeleton['__dataclass__']}, which is not a dataclass")
        return cls(**{k: unflatten(v, tensors) for k, v in skeleton["fields"].items()})
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


# --- files ----------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def round_dir(folder: Path, round_index: int) -> Path:
    return Path(folder) / f"round-{round_index:04d}"


def save_checkpoint(folder: Path, round_index: int, fields: dict[str, Any], rows: list[dict],
                    info: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `round_index` atomically under `folder`; keep the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(fields, tensors)
    blobs = {
        # safetensors needs at least one tensor to carry its header in some versions: keep a marker.
        "state.safetensors": st_save(tensors or {"__empty__": torch.zeros(0)}),
        # Strict JSON (no bare NaN), yet exact: a non-finite float is tagged {"__float__": "nan"}.
        "state.json": json.dumps(tag_nonfinite({"round": round_index, "fields": skeleton, "rows": rows,
                                                "info": info}), default=_jsonable, allow_nan=False).encode("utf-8"),
    }
    manifest = {"format": FORMAT, "round": round_index,
                "files": {name: {"sha256": _sha256(b), "bytes": len(b)} for name, b in blobs.items()}}
    blobs["manifest.json"] = json.dumps(manifest, indent=2).encode("utf-8")
    final = round_dir(folder, round_index)
    tmp = folder / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, data in blobs.items():  # the manifest last: a folder with one is complete
        _write_synced(tmp / name, data)
    _fsync_dir(tmp)
    if final.exists():  # re-running a round after a resume: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    _prune(folder, round_index, keep)
    return final


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"checkpoint rows: not JSON serializable: {type(value).__name__}")


def checkpoint_rounds(folder: Path) -> list[int]:
    """Rounds with a checkpoint folder under `folder`, oldest first (not yet verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _DIR.match(p.name)))


def _prune(folder: Path, newest: int, keep: int) -> None:
    """Keep the `keep` newest up to `newest`; later ones are from an abandoned run (a resume went back
    past a damaged checkpoint), so they go too, as do leftover temporary folders."""
    for leftover in folder.glob(".tmp-round-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    rounds = checkpoint_rounds(folder)
    stale = [r for r in rounds if r > newest] + [r for r in rounds if r <= newest][:-keep]
    for r in stale:
        shutil.rmtree(round_dir(folder, r), ignore_errors=True)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint folder; CheckpointError says what is wrong with it."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: manifest.json missing or unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this fedlora reads {FORMAT}")
    blobs = {}
    for name in _FILES:
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: {name} unreadable ({exc})") from None
        expected = files.get(name, {})
        if len(data) != expected.get("bytes") or _sha256(data) != expected.get("sha256"):
            raise CheckpointError(f"{path}: {name} fails its checksum ({len(data)} bytes, manifest says "
                                  f"{expected.get('bytes')}): truncated or corrupted")
        blobs[name] = data
    try:
        body = untag_nonfinite(json.loads(blobs["state.json"]))  # bare NaN of older checkpoints still reads
        tensors = st_load(blobs["state.safetensors"])
        return Checkpoint(round=int(body["round"]), fields=unflatten(body["fields"], tensors), rows=body["rows"],
                          info=body["info"], path=path)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:  # checksums pass, content does not
        raise CheckpointError(f"{path}: content does not parse ({type(exc).__name__}: {exc})") from None


def load_latest(folder: Path) -> Checkpoint:
    """The newest checkpoint under `folder` that verifies; bad ones are skipped with a warning."""
    rounds = checkpoint_rounds(folder)
    for r in reversed(rounds):
        try:
            return read_checkpoint(round_dir(folder, r))
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s; falling back to the previous one", exc)
    found = f"{len(rounds)} found, none valid" if rounds else "none found"
    raise CheckpointError(f"no usable checkpoint in {folder} ({found}); start the run again with `fedlora run`")


def state_fields(state: Any) -> dict[str, Any]:
    """A run state dataclass as {field: value}, every field (fields added later included)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def restore_state(cls: type, fields: dict[str, Any]) -> Any:
    """`cls(**fields)`; a saved field `cls` no longer has is an error, a new field keeps its default."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"checkpoint holds run-state fields this fedlora does not know: {unknown}; "
                              "resume with the fedlora version that wrote it")
    return cls(**fields)


def config_differences(saved: dict, current: dict, default: dict, prefix: str = "") -> list[str]:
    """Dotted keys where a checkpoint's config and the current one differ. A key the checkpoint
    lacks (added by a newer fedlora) counts only if the current value is not its default."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if key not in saved:
            if key not in default or current[key] != default[key]:
                out.append(name)
        elif key not in current:
            out.append(name)
        elif isinstance(saved[key], dict) and isinstance(current[key], dict):
            out += config_differences(saved[key], current[key], default.get(key) or {}, name + ".")
        elif saved[key] != current[key]:
            out.append(name)
    return out


def check_checkpoint_config(ckpt: Checkpoint, cfg: RunConfig, where: str) -> None:
    """CheckpointError unless `ckpt` was written with `cfg` (`where` names it in the message)."""
    differ = config_differences(ckpt.info.get("config") or {}, json.loads(json.dumps(cfg.to_dict())),
                                json.loads(json.dumps(RunConfig().to_dict())))
    if differ:
        raise CheckpointError(f"{ckpt.path} was written with another config than {where} "
                              f"(differs in {', '.join(differ[:5])}); restore that config or start a new run")
