"""Compute precision (bf16 autocast vs fp32), one-encoding scoring, gradient checkpointing, and the
CUDA-only options refused on a CPU (model/precision.py, train/batches.py, train/evaluate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_config, wrapped_tiny
from fedlora.config import ConfigError, TrainConfig
from fedlora.fl.preflight import preflight
from fedlora.model import ModelError, load_model
from fedlora.model.lora import adapter_parameters, adapter_state, load_adapter_state
from fedlora.model.precision import (
    compute_context,
    compute_precision,
    cpu_has_fast_bf16,
    resolve_precision,
    set_compute_precision,
)
from fedlora.train.batches import EncodedExamples, collate, encode_examples, forward_logits, target_logprobs
from fedlora.train.evaluate import label_loglik
from fedlora.train.local import local_train

CPU = torch.device("cpu")

SCORE_TOL = 0.05
"""bf16 vs fp32 agreement of label log-likelihoods (nats) on the tiny model. bf16 keeps 8 bits of
mantissa, so each matmul carries a relative error of about 0.4 %; the tiny model's scores are
-3 to -12 nats, and the largest difference measured is about 0.02."""
LOSS_TOL = 0.02
"""bf16 vs fp32 agreement of the mean training loss over a few steps, relative."""


@pytest.fixture()
def model_tok():
    model, tok = wrapped_tiny(seed=0)
    gen = torch.Generator().manual_seed(7)
    load_adapter_state(model, {k: torch.randn(p.shape, generator=gen) * 0.1
                               for k, p in adapter_parameters(model).items()})
    return model, tok


def _examples(tok, verbalizers=(" no", " yes")) -> EncodedExamples:
    prompts = ["age is 3. Answer:", "the patient is young and the tumor is small. Answer:",
               "radius is 12.5. texture is 3. Answer:", "income is high. Answer:",
               "Question: Is the client good? Answer:", "a b c d e f g h Answer:"]
    return encode_examples(tok, prompts, np.array([0, 1, 1, 0, 1, 0]), list(verbalizers), max_length=64)


# --- resolution ---------------------------------------------------------------------------------


def test_resolve_precision_choices(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setattr("fedlora.model.precision.cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"  # a CPU without bf16 units keeps fp32
    monkeypatch.setattr("fedlora.model.precision.cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    with pytest.raises(ModelError, match="model.precision='half'"):
        resolve_precision("half", CPU)
    with pytest.raises(ModelError, match="not mps"):
        resolve_precision("bf16", torch.device("mps"))
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_load_model_records_precision_and_context():
    model, _ = load_model(make_config("model.name=tiny", "model.precision=bf16").model)
    assert compute_precision(model) == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay as loaded
    with compute_context(model):
        assert torch.is_autocast_enabled("cpu")
    fp32, _ = load_model(make_config("model.name=tiny", "model.precision=fp32").model)
    with compute_context(fp32):
        assert not torch.is_autocast_enabled("cpu")
    auto, _ = load_model(make_config("model.name=tiny").model)
    assert compute_precision(auto) == ("bf16" if cpu_has_fast_bf16() else "fp32")


def test_bad_precision_names_fail_in_config():
    for key in ("model.precision=fp16", "model.quantization=3bit", "train.optimizer=sgd"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            make_config(key)


# --- bf16 agreement -----------------------------------------------------------------------------


def test_bf16_scores_agree_with_fp32(model_tok):
    model, tok = model_tok
    data = _examples(tok, (" no", " yes", " maybe so"))
    set_compute_precision(model, "fp32")
    fp32 = label_loglik(model, data, tok.pad_token_id, batch_size=4)
    set_compute_precision(model, "bf16")
    bf16 = label_loglik(model, data, tok.pad_token_id, batch_size=4)
    assert not np.array_equal(fp32, bf16)  # autocast really ran
    np.testing.assert_allclose(bf16, fp32, atol=SCORE_TOL, rtol=0)
    assert (bf16.argmax(axis=1) == fp32.argmax(axis=1)).mean() >= 5 / 6


def test_bf16_training_agrees_and_keeps_fp32_state(model_tok):
    model, tok = model_tok
    data = _examples(tok)
    start = adapter_state(model)
    params = list(adapter_parameters(model).values())
    cfg = TrainConfig(lr=1e-3, batch_size=3)
    results = {}
    for precision in ("fp32", "bf16"):
        load_adapter_state(model, start)
        set_compute_precision(model, precision)
        for p in params:
            p.requires_grad_(True)
        res = local_train(model, params, data, cfg, steps=3, rng=np.random.default_rng(0),
                          pad_id=tok.pad_token_id)
        results[precision] = (res.loss, adapter_state(model))
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    loss32, state32 = results["fp32"]
    loss16, state16 = results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=LOSS_TOL)
    for name in state32:  # same steps, nearly the same place
        moved = (state32[name] - start[name]).norm()
        assert (state16[name] - state32[name]).norm() <= 0.1 * moved + 1e-6


# --- one encoding of the prompt -----------------------------------------------------------------


def test_multi_token_scores_equal_per_pair_encoding(model_tok):
    """Verbalizers of 1, 2 and 3 tokens (two share their first token) scored from one encoding of
    each prompt equal encoding every (prompt, verbalizer) pair on its own, as before."""
    model, tok = model_tok
    set_compute_precision(model, "fp32")
    data = _examples(tok, (" no", " yes indeed", " yes indeed it is", " unclear"))
    lengths = [len(v) for v in data.verbalizer_ids]
    assert max(lengths) >= 3 and min(lengths) == 1
    assert data.verbalizer_ids[1][0] == data.verbalizer_ids[2][0]
    shared = label_loglik(model, data, tok.pad_token_id, batch_size=4)
    pairs = [(p, v) for p in data.prompt_ids for v in data.verbalizer_ids]
    with torch.no_grad():
        logp, _ = target_logprobs(model, collate(pairs, tok.pad_token_id, CPU))
    np.testing.assert_allclose(shared, logp.numpy().reshape(len(data), -1), atol=1e-4, rtol=0)


def test_forward_never_builds_a_kv_cache(model_tok):
    model, tok = model_tok
    seen = []
    handle = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    try:
        batch = collate([([1, 5, 6], [7]), ([1, 8], [9])], tok.pad_token_id, CPU)
        forward_logits(model, batch, keep=2)
        target_logprobs(model, batch)
        label_loglik(model, _examples(tok), tok.pad_token_id)  # single-token verbalizers
    finally:
        handle.remove()
    assert seen and all(flag is False for flag in seen)


# --- gradient checkpointing ---------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = {}
    for checkpointing in (False, True):
        model, tok = load_model(make_config("model.name=tiny", "model.precision=fp32",
                                            f"model.gradient_checkpointing={str(checkpointing).lower()}").model)
        from fedlora.model.lora import wrap_lora

        model = wrap_lora(model, make_config().lora, seed=1)
        load_adapter_state(model, {k: torch.full(p.shape, 0.05) for k, p in adapter_parameters(model).items()})
        base = model.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)
        assert (base.is_gradient_checkpointing if flag is None else flag) == checkpointing
        model.train()
        batch = collate([([1, 5, 6, 7], [8, 9]), ([1, 10], [11])], tok.pad_token_id, CPU)
        logp, count = target_logprobs(model, batch)
        (-(logp / count).mean()).backward()
        grads[checkpointing] = {k: p.grad.clone() for k, p in adapter_parameters(model).items()}
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5)


# --- CUDA-only options on a CPU -----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
@pytest.mark.parametrize("setting, named", [("model.quantization=4bit", "model.quantization=4bit"),
                                            ("model.quantization=8bit", "model.quantization=8bit"),
                                            ("train.optimizer=paged_adamw_8bit", "train.optimizer=paged_adamw_8bit")])
def test_cuda_only_options_are_refused_on_cpu(setting, named):
    cfg = make_config("model.name=tiny", setting)
    with pytest.raises(ModelError, match=f"{named} needs a CUDA GPU.*model.quantization=none"):
        preflight(cfg)
    if setting.startswith("model."):
        with pytest.raises(ModelError, match="needs a CUDA GPU"):
            load_model(cfg.model)


def test_cpu_bf16_training_pass_uses_eager_attention_and_restores_it(model_tok):
    """Short training batches under bf16 on a CPU swap SDPA for eager attention (faster backward
    here); scoring and fp32 keep the model's own implementation, and it is restored after."""
    from fedlora.model.precision import EAGER_TRAIN_MAX_WIDTH

    model, tok = model_tok
    config = model.get_base_model().config
    assert config._attn_implementation == "sdpa"
    seen = []
    handle = model.get_base_model().register_forward_pre_hook(lambda *a: seen.append(config._attn_implementation))
    batch = collate([([1, 5, 6], [7]), ([1, 8], [9])], tok.pad_token_id, CPU)
    wide = collate([([1] * (EAGER_TRAIN_MAX_WIDTH + 1), [7])], tok.pad_token_id, CPU)
    try:
        set_compute_precision(model, "bf16")
        forward_logits(model, batch, keep=2)  # grad enabled: a training pass
        forward_logits(model, wide, keep=2)  # too wide: SDPA stays
        with torch.no_grad():
            forward_logits(model, batch, keep=2)  # scoring
        set_compute_precision(model, "fp32")
        forward_logits(model, batch, keep=2)
    finally:
        handle.remove()
    assert seen == ["eager", "sdpa", "sdpa", "sdpa"]
    assert config._attn_implementation == "sdpa"
