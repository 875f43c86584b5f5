"""Payloads: safetensors bytes with metadata, validated on receipt (never unpickled)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from fedlora import PayloadError
from fedlora.fl.payload import decode, encode, spec_of


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layers.0.q_proj.lora_A": torch.randn(4, 8, generator=gen),
        "layers.0.q_proj.lora_B": torch.randn(8, 4, generator=gen).t(),  # non-contiguous view
        "half": torch.randn(3, generator=gen).to(torch.bfloat16),
        "count": torch.arange(5, dtype=torch.int64),
    }


def test_round_trip_is_exact_with_metadata():
    tensors = _tensors()
    meta = {"num_examples": 37, "client_id": 2, "note": "héllo"}
    blob = encode(tensors, meta)
    assert isinstance(blob, bytes)
    out, out_meta = decode(blob, expected=spec_of(tensors))
    assert out_meta == meta
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_round_trip_without_expected_or_meta():
    tensors = _tensors()
    out, meta = decode(encode(tensors))
    assert meta == {} and all(torch.equal(out[k], v) for k, v in tensors.items())


def test_empty_payload_round_trips():
    out, meta = decode(encode({}, {"num_examples": 3}), expected={})
    assert out == {} and meta == {"num_examples": 3}
    out, meta = decode(encode({}))
    assert out == {} and meta == {}


def test_encoding_is_deterministic_and_size_depends_on_shapes_only():
    a = {"x": torch.zeros(3, 2)}
    b = {"x": torch.ones(3, 2)}
    assert encode(a, {"n": 1}) == encode(a, {"n": 1})
    assert len(encode(a, {"n": 1})) == len(encode(b, {"n": 1}))
    # 6 float32 values = 24 bytes of data after the header
    assert len(encode(a)) >= 24


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\x00" * 7, b"\xff" * 64,
                                  (10).to_bytes(8, "little") + b"{not json}",
                                  (10**9).to_bytes(8, "little") + b"{}"])
def test_rejects_garbage(blob):
    with pytest.raises(PayloadError, match="safetensors"):
        decode(blob)


def test_rejects_truncated():
    blob = encode(_tensors())
    with pytest.raises(PayloadError):
        decode(blob[:-5])


def test_rejects_non_bytes():
    with pytest.raises(PayloadError, match="bytes"):
        decode("a string")  # type: ignore[arg-type]


def test_rejects_oversize():
    blob = encode(_tensors())
    with pytest.raises(PayloadError, match="cap"):
        decode(blob, max_bytes=len(blob) - 1)
    decode(blob, max_bytes=len(blob))  # exactly at the cap is fine


def test_rejects_missing_and_extra_tensors():
    tensors = _tensors()
    spec = spec_of(tensors)
    without = {k: v for k, v in tensors.items() if k != "half"}
    with pytest.raises(PayloadError, match="missing.*half"):
        decode(encode(without), expected=spec)
    with pytest.raises(PayloadError, match="unexpected.*intruder"):
        decode(encode({**tensors, "intruder": torch.zeros(1)}), expected=spec)


def test_rejects_wrong_shape_naming_the_tensor():
    tensors = _tensors()
    spec = spec_of(tensors)
    bad = {**tensors, "layers.0.q_proj.lora_A": torch.zeros(4, 9)}
    with pytest.raises(PayloadError, match=r"layers\.0\.q_proj\.lora_A: shape \(4, 9\), expected \(4, 8\)"):
        decode(encode(bad), expected=spec)


def test_rejects_wrong_dtype_naming_the_tensor():
    tensors = _tensors()
    spec = spec_of(tensors)
    bad = {**tensors, "layers.0.q_proj.lora_A": tensors["layers.0.q_proj.lora_A"].double()}
    with pytest.raises(PayloadError, match=r"layers\.0\.q_proj\.lora_A: dtype torch\.float64"):
        decode(encode(bad), expected=spec)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejects_non_finite(value, dtype):
    bad = torch.zeros(3, 3, dtype=dtype)
    bad[1, 2] = value
    with pytest.raises(PayloadError, match=r"poisoned: contains NaN or Inf"):
        decode(encode({"fine": torch.ones(2), "poisoned": bad}))
    with pytest.raises(PayloadError, match="poisoned"):
        decode(encode({"fine": torch.ones(2), "poisoned": bad}), expected={
            "fine": ((2,), torch.float32), "poisoned": ((3, 3), dtype)})


def test_rejects_bad_metadata():
    tensors = {"x": torch.zeros(2)}
    with pytest.raises(PayloadError, match="metadata"):
        decode(st_save(tensors, metadata={"fedlora": "{not json"}))
    with pytest.raises(PayloadError, match="metadata"):
        decode(st_save(tensors, metadata={"fedlora": json.dumps([1, 2])}))
    out, meta = decode(st_save(tensors))  # a plain safetensors file: no metadata is fine
    assert meta == {} and torch.equal(out["x"], tensors["x"])


def test_payload_error_is_value_error():
    assert issubclass(PayloadError, ValueError)


# --- round and sender consistency, metadata types, reason codes ----------------------------------

def test_round_and_sender_are_written_and_checked():
    tensors = {"x": torch.ones(2)}
    blob = encode(tensors, {"num_examples": 4}, round_index=3, client_id=1)
    out, meta = decode(blob, expected=spec_of(tensors), expected_round=3, expected_sender=1,
                       require_meta=("num_examples",))
    assert meta == {"num_examples": 4, "round": 3, "client_id": 1} and torch.equal(out["x"], tensors["x"])
    with pytest.raises(PayloadError, match=r"'round': expected 4, received 3") as info:
        decode(blob, expected_round=4)
    assert info.value.reason == "round"
    with pytest.raises(PayloadError, match=r"'client_id': expected 2, received 1") as info:
        decode(blob, expected_sender=2)
    assert info.value.reason == "sender"
    with pytest.raises(PayloadError, match=r"'client_id': expected 1, received '1'"):
        decode(encode(tensors, client_id="1"), expected_sender=1)  # no type coercion


def test_missing_round_or_sender_is_rejected_when_expected():
    blob = encode({"x": torch.ones(2)}, {"num_examples": 4})
    with pytest.raises(PayloadError, match="'round': expected 1, received 'nothing'"):
        decode(blob, expected_round=1)
    with pytest.raises(PayloadError, match="'client_id'"):
        decode(blob, expected_sender=0)
    with pytest.raises(PayloadError, match=r"lacks required field\(s\) \['weight'\]"):
        decode(blob, require_meta=("weight",))
    decode(blob)  # nothing expected: fine


def test_encode_refuses_conflicting_round_or_sender():
    with pytest.raises(ValueError, match="disagrees"):
        encode({"x": torch.ones(1)}, {"client_id": 1}, client_id=2)
    with pytest.raises(ValueError):
        encode({"x": torch.ones(1)}, {"loss": float("nan")})  # metadata is strict JSON


@pytest.mark.parametrize("raw, match", [
    ('{"num_examples": -1}', "num_examples"),
    ('{"num_examples": 2.5}', "num_examples"),
    ('{"num_examples": true}', "num_examples"),
    ('{"num_examples": "7"}', "num_examples"),
    ('{"round": [1]}', "round"),
    ('{"client_id": null}', "client_id"),
    ('{"num_examples": Infinity}', "not JSON"),
    ('{"num_examples": NaN}', "not JSON"),
    ("[" * 60_000, "not JSON"),  # deeper than the recursion limit, under the size cap
    ("x" * 70_000, "at most"),
])
def test_metadata_fields_are_typed(raw, match):
    with pytest.raises(PayloadError, match=match) as info:
        decode(st_save({"x": torch.zeros(2)}, metadata={"fedlora": raw}))
    assert info.value.reason == "metadata"


def _raw(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("dtype, nbytes", [("F4", 1), ("F6_E2M3", 3), ("F8_E8M0", 1), ("E8M0", 1), ("XX", 1)])
def test_dtypes_torch_cannot_hold_are_parse_errors(dtype, nbytes):
    blob = _raw({"x": {"dtype": dtype, "shape": [2 if dtype == "F4" else 4 if dtype == "F6_E2M3" else 1],
                       "data_offsets": [0, nbytes]}}, b"\x01" * nbytes)
    with pytest.raises(PayloadError, match="not valid safetensors.*dtype") as info:
        decode(blob)
    assert info.value.reason == "parse"


@pytest.mark.parametrize("dtype, nbytes", [("F8_E4M3", 1), ("F8_E5M2", 1), ("C64", 8)])
def test_non_finite_float8_and_complex_are_caught(dtype, nbytes):
    blob = _raw({"x": {"dtype": dtype, "shape": [1], "data_offsets": [0, nbytes]}}, b"\xff" * nbytes)
    with pytest.raises(PayloadError, match="x: contains NaN or Inf") as info:
        decode(blob)
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("claimed", [10**9, 2**64 - 1, 100 * 1024**2])
def test_header_length_claims_are_bounded(claimed):
    with pytest.raises(PayloadError, match="header length field claims"):
        decode(claimed.to_bytes(8, "little") + b"{}" + b"\x00" * 64)


def test_reason_codes():
    t = _tensors()
    cases = {"size": lambda: decode(encode(t), max_bytes=10), "parse": lambda: decode(b"junk"),
             "keys": lambda: decode(encode({"a": torch.ones(1)}), expected=spec_of(t)),
             "shape": lambda: decode(encode({**t, "count": torch.arange(6)}), expected=spec_of(t)),
             "dtype": lambda: decode(encode({**t, "count": torch.arange(5).int()}), expected=spec_of(t))}
    for reason, call in cases.items():
        with pytest.raises(PayloadError) as info:
            call()
        assert info.value.reason == reason
    assert PayloadError("x").reason == "invalid"


def test_bytearray_and_memoryview_are_accepted():
    blob = encode(_tensors())
    for view in (bytearray(blob), memoryview(blob)):
        out, _ = decode(view, expected=spec_of(_tensors()))
        assert set(out) == set(_tensors())
