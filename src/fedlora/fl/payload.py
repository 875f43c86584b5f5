"""What travels between clients and server: safetensors bytes, validated on receipt.

Nothing received is ever unpickled. A payload is a flat `{name: tensor}` dict plus a small JSON
object of metadata (the example count, the round, the sender). `decode` is the one validation
step every transport calls (the simulator, and the Flower transport); it checks, in this order:

1. the blob is bytes and under the size cap (before anything is parsed or allocated); with a
   schema the cap is `payload_cap(spec)`: the expected tensor bytes plus a small header allowance;
2. the header: its length field fits in the blob and under `MAX_HEADER_BYTES`, it is a JSON object,
   every tensor has a dtype torch can hold;
3. the tensors the header declares are the expected ones (count and names, then shapes and
   dtypes), before any tensor is read: a header that declares 200,000 tensors costs one JSON parse;
4. the metadata is a JSON object (no NaN/Infinity, bounded size and nesting), known fields have
   their types, required fields are present, and `round` / `client_id` equal the expected ones
   (a stale, replayed or misrouted update is rejected);
5. the bytes parse as safetensors (offsets, shapes, dtypes consistent) and every value is finite.

A failure raises `PayloadError` naming the tensor or field and the problem; `.reason` is a short
code (`parse`, `size`, `keys`, `shape`, `dtype`, `non_finite`, `metadata`, `round`, `sender`;
`examples` from fl/schema.py) for compact rejection counts in the metrics.

>>> blob = encode({"x": torch.zeros(2)}, {"num_examples": 3}, round_index=1, client_id=0)
>>> tensors, meta = decode(blob, expected={"x": ((2,), torch.float32)}, expected_round=1, expected_sender=0)
>>> meta
{'client_id': 0, 'num_examples': 3, 'round': 1}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_PAYLOAD_BYTES = 2 * 1024**3
MAX_HEADER_BYTES = 16 * 1024**2
"""safetensors itself allows 100 MB; a LoRA payload's header is ~100 bytes per tensor."""
MAX_META_CHARS = 64 * 1024
"""Our metadata is a handful of small fields."""

HEADER_BYTES_PER_TENSOR = 160
"""Header room per tensor beyond its JSON-quoted name: dtype, a shape of a few dims, two offsets of up
to 20 digits and the punctuation come to under 100 bytes; the rest is slack."""
META_ALLOWANCE = 4096
"""Header room for our metadata (count, round, sender: under 100 characters, quoted twice) and
safetensors' 8-byte alignment padding."""

# safetensors dtype names that torch can hold (F4/F6/E8M0 exist in the format, not in torch).
_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
_DTYPES = set(_TORCH_DTYPES)
_EMPTY = "__empty__"
"""`encode`'s marker tensor (shape [0]) for a payload with no tensors."""
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
# Known metadata fields and the JSON types they must have.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "num_examples": (int,), "round": (int,), "client_id": (int, str),
}


class PayloadError(ValueError):
    """A received payload is malformed or does not match what the method expects.

    `reason` is a short code for the metrics (see the module docstring).
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object] | None = None, *,
           round_index: int | None = None, client_id: int | str | None = None) -> bytes:
    """Serialize tensors (made contiguous, moved to CPU) and JSON-able metadata to safetensors bytes.

    `round_index` and `client_id`, when given, are written as the metadata fields `round` and
    `client_id`, which `decode(..., expected_round=, expected_sender=)` checks.
    """
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fields = dict(meta or {})
    for key, value in (("round", round_index), ("client_id", client_id)):
        if value is not None:
            if key in fields and fields[key] != value:
                raise ValueError(f"encode: meta[{key!r}]={fields[key]!r} disagrees with {key}={value!r}")
            fields[key] = value
    header = {"fedlora": json.dumps(fields, sort_keys=True, allow_nan=False)}
    if not clean:
        # safetensors cannot hold zero tensors with metadata only in older versions; keep one marker.
        clean = {"__empty__": torch.zeros(0)}
    return st_save(clean, metadata=header)


def decode(
    blob: bytes,
    expected: Spec | Callable[[list[str]], Spec] | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    *,
    expected_round: int | None = None,
    expected_sender: int | str | None = None,
    require_meta: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Parse and validate a payload (see the module docstring for the checks, in order).

    `expected` maps name -> (shape, dtype) when known, or is a function of the tensor names the
    header declares that returns that map (a schema whose optional side channels depend on what
    was sent); `expected_round` / `expected_sender` must equal the metadata's `round` /
    `client_id` when given (the field is then required); `require_meta` names further metadata
    fields that must be present (e.g. "num_examples").
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(blob).__name__}", "parse")
    size = memoryview(blob).nbytes
    if size > max_bytes:  # before any copy, parse or allocation
        raise PayloadError(f"payload of {size} bytes exceeds the {max_bytes}-byte cap", "size")
    blob = bytes(blob)
    header = _read_header(blob)
    if expected is not None:
        _check_declared(header, expected)
    meta = _read_meta(header)
    _check_meta(meta, expected_round, expected_sender, require_meta)
    try:  # only now, with the header known to be what we expect, are tensors read
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, KeyError, TypeError, OverflowError) as exc:
        raise PayloadError(f"payload is not valid safetensors: {exc}", "parse") from exc
    tensors.pop(_EMPTY, None)
    for name, t in tensors.items():
        if not _finite(t):
            raise PayloadError(f"{name}: contains NaN or Inf", "non_finite")
    return tensors, meta


def payload_cap(spec: Spec) -> int:
    """The largest payload a sender of `spec` can honestly send: its tensor bytes plus the header
    (per tensor its name and `HEADER_BYTES_PER_TENSOR`, one more for `encode`'s empty marker, and
    `META_ALLOWANCE`). A LoRA upload of 8 kB gets a cap of a few kB more, not `MAX_PAYLOAD_BYTES`."""
    data = sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.values())
    names = sum(len(json.dumps(name)) for name in [*spec, _EMPTY])
    return 8 + data + names + HEADER_BYTES_PER_TENSOR * (len(spec) + 1) + META_ALLOWANCE


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) map that `decode(..., expected=...)` checks against."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _read_header(blob: bytes) -> dict:
    """The safetensors header (8-byte little-endian length, then JSON), bounded before parsing."""
    def bad(why: str) -> PayloadError:
        return PayloadError(f"payload is not valid safetensors: {why}", "parse")

    if len(blob) < 8:
        raise bad(f"{len(blob)} bytes, shorter than the 8-byte header length field")
    size = int.from_bytes(blob[:8], "little")
    if size > min(len(blob) - 8, MAX_HEADER_BYTES):
        raise bad(f"the header length field claims {size} bytes; the payload has {len(blob) - 8} "
                  f"after it and the header cap is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"the header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name[:80]!r}: dtype {str(dtype)[:20]!r} is not one of {sorted(_DTYPES)}")
    return header


def _read_meta(header: dict) -> dict[str, object]:
    """Our JSON metadata from the header's `__metadata__` (an absent one is an empty object)."""
    fields = header.get("__metadata__") or {}
    raw = fields.get("fedlora", "{}") if isinstance(fields, dict) else None
    if not isinstance(raw, str) or len(raw) > MAX_META_CHARS:
        raise PayloadError(f"payload metadata must be a JSON string of at most {MAX_META_CHARS} characters",
                           "metadata")
    try:
        meta = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"payload metadata is not JSON: {str(exc)[:200]}", "metadata") from None
    if not isinstance(meta, dict):
        raise PayloadError("payload metadata must be a JSON object", "metadata")
    return meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _check_meta(meta: dict, expected_round, expected_sender, require_meta: Iterable[str]) -> None:
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if key in meta and (isinstance(value, bool) or not isinstance(value, types)
                            or (isinstance(value, int) and value < 0)):
            kinds = " or ".join("non-negative integer" if t is int else "string" for t in types)
            raise PayloadError(f"payload metadata {key!r} must be a {kinds}, received {value!r:.80}", "metadata")
    for key, want, reason in (("round", expected_round, "round"), ("client_id", expected_sender, "sender")):
        if want is not None and meta.get(key) != want:
            got = meta.get(key, "nothing")
            raise PayloadError(f"payload metadata {key!r}: expected {want!r}, received {got!r:.80} "
                               "(a stale, replayed or misrouted update)", reason)
    missing = [key for key in require_meta if key not in meta]
    if missing:
        raise PayloadError(f"payload metadata lacks required field(s) {missing}", "metadata")


def _check_declared(header: dict, expected: Spec | Callable[[list[str]], Spec]) -> None:
    """The tensors the header declares match `expected`: names first (a count mismatch is caught
    without looking at any entry), then each declared shape and dtype."""
    names = [n for n in header if n != "__metadata__" and not (n == _EMPTY and header[n].get("shape") == [0])]
    spec = expected(names) if callable(expected) else expected
    if len(names) != len(spec) or set(names) != set(spec):
        _keys_error(names, spec)
    declared = {}
    for name in spec:
        shape = header[name].get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise PayloadError(f"payload is not valid safetensors: tensor {name[:80]!r}: shape {str(shape)[:40]}",
                               "parse")
        declared[name] = (tuple(shape), _TORCH_DTYPES[header[name]["dtype"]])
    check_spec(declared, spec)


def _keys_error(names: Iterable[str], expected: Spec) -> None:
    names = set(names)
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    raise PayloadError(f"payload tensors do not match: missing {missing[:3]}, unexpected "
                       f"{[e[:80] for e in extra[:3]]} ({len(names)} declared, {len(expected)} expected)", "keys")


def check_spec(declared: Spec, expected: Spec) -> None:
    """`declared` (name -> (shape, dtype), e.g. `spec_of(tensors)`) is exactly `expected`."""
    if set(declared) != set(expected):
        _keys_error(declared, expected)
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = declared[name]
        if tuple(got_shape) != tuple(shape):
            raise PayloadError(f"{name}: shape {tuple(got_shape)}, expected {tuple(shape)}", "shape")
        if got_dtype != dtype:
            raise PayloadError(f"{name}: dtype {got_dtype}, expected {dtype}", "dtype")


def _finite(t: torch.Tensor) -> bool:
    """Every value finite (complex: both parts; float8 is upcast, torch has no isfinite for it)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.float32)
    return bool(torch.isfinite(t).all())
