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
