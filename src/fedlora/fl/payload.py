"""What travels between clients and server: safetensors bytes, validated on receipt.

Nothing received is ever unpickled. A payload is a flat `{name: tensor}` dict plus a few string
metadata fields (e.g. the example count). `decode` checks, in this order: the bytes parse as
safetensors, the size is under the cap, names are the expected ones, shapes and dtypes match,
and every value is finite. A failure raises `PayloadError` naming the tensor and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_PAYLOAD_BYTES = 2 * 1024**3


class PayloadError(ValueError):
    """A received payload is malformed or does not match what the method expects."""


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object] | None = None) -> bytes:
    """Serialize tensors (made contiguous, moved to CPU) and JSON-able metadata to safetensors bytes."""
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {"fedlora": json.dumps(dict(meta or {}), sort_keys=True)}
    if not clean:
        # safetensors cannot hold zero tensors with metadata only in older versions; keep one marker.
        clean = {"__empty__": torch.zeros(0)}
    return st_save(clean, metadata=header)


def decode(
    blob: bytes,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Parse and validate a payload; `expected` maps name -> (shape, dtype) when known."""
    if not isinstance(blob, (bytes, bytearray)):
        raise PayloadError(f"payload must be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise PayloadError(f"payload of {len(blob)} bytes exceeds the {max_bytes}-byte cap")
    try:
        tensors = st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PayloadError(f"payload is not valid safetensors: {exc}") from exc
    meta = _read_meta(blob)
    tensors.pop("__empty__", None)
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise PayloadError(f"payload tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape):
                raise PayloadError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
            if t.dtype != dtype:
                raise PayloadError(f"{name}: dtype {t.dtype}, expected {dtype}")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PayloadError(f"{name}: contains NaN or Inf")
    return tensors, meta


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) map that `decode(..., expected=...)` checks against."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _read_meta(blob: bytes) -> dict[str, object]:
    """Read our JSON metadata from the safetensors header (8-byte length, then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(bytes(blob[8 : 8 + size]).decode("utf-8"))
    raw = (header.get("__metadata__") or {}).get("fedlora", "{}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise PayloadError("payload metadata must be a JSON object")
    return meta
