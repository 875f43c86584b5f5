"""What travels over Flower: fedlora's safetensors payload bytes inside a Flower `ConfigRecord`.

Flower moves records; fedlora decides what is in them. A payload is `fl/payload.encode`'s bytes
under one key of a `ConfigRecord` (Flower's bytes value type), so the wire carries safetensors
only: no pickle, no Flower-side re-serialization of tensors, and the receiver runs the same
`decode` validation (size cap, names, shapes, dtypes, finite values) as the simulator does.

>>> rec = pack({"x": torch.ones(2)}, {"num_examples": 3})
>>> tensors, meta = unpack(rec, {"x": ((2,), torch.float32)})
>>> meta["num_examples"]
3
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord

from fedlora.fl.payload import PayloadError, decode, encode

PAYLOAD = "fedlora.payload"
"""The ConfigRecord key holding the safetensors bytes."""
RECORD = "fedlora"
"""The RecordDict key of that ConfigRecord in every fedlora message."""

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def pack(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object] | None = None,
         **fields: int | float | str | bool) -> ConfigRecord:
    """A ConfigRecord with the encoded payload and a few plain scalar fields beside it."""
    return ConfigRecord({PAYLOAD: encode(tensors, meta), **fields})


def blob_of(record: ConfigRecord) -> bytes:
    blob = record.get(PAYLOAD)
    if not isinstance(blob, (bytes, bytearray)):
        raise PayloadError(f"message has no {PAYLOAD!r} bytes (got {type(blob).__name__})", "no_payload")
    return bytes(blob)


def unpack(record: ConfigRecord, expected: Spec | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode and validate the payload a message carries (raises PayloadError)."""
    return decode(blob_of(record), expected=expected)


def check_subset(tensors: Mapping[str, torch.Tensor], allowed: Spec) -> None:
    """Every received tensor is one the receiver knows, with its shape and dtype.

    Used where the exact set of names depends on the method (what a server sends down):
    the receiver checks against its own adapter's spec.
    """
    for name, t in tensors.items():
        if name not in allowed:
            raise PayloadError(f"unexpected tensor {name!r}")
        shape, dtype = allowed[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise PayloadError(f"{name}: {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
