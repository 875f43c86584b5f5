"""LoRA wrapping, adapter state as named tensors, trainable masks, and the local training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_same_tensors, base_snapshot, make_config, wrapped_tiny
from fedlora.model import build_tiny_model, wrap_lora
from fedlora.model.lora import (
    adapter_parameters,
    adapter_state,
    init_adapter_state,
    load_adapter_state,
    lora_scaling,
    set_trainable,
)
from fedlora.train.batches import EncodedExamples, collate, target_logprobs
from fedlora.train.local import batch_order, local_train

LAYERS = (0, 1)


def _expected_names(targets=("q_proj", "v_proj")) -> set[str]:
    return {f"model.layers.{i}.self_attn.{m}.lora_{f}" for i in LAYERS for m in targets for f in "AB"}


@pytest.fixture
def peft():
    model, tok = wrapped_tiny(seed=0)
    return model, tok


# --- wrapping and names ------------------------------------------------------------------------


def test_wrap_puts_lora_only_on_targets(peft):
    model, _ = peft
    params = adapter_parameters(model)
    assert set(params) == _expected_names()
    assert list(params) == sorted(params)  # stable order
    lora_modules = {name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert lora_modules and all(name.split(".")[-1] in ("q_proj", "v_proj") for name in lora_modules)
    assert len(lora_modules) == 4
    # hidden 64, 4 heads of 16, 2 KV heads: q_proj 64 -> 64, v_proj 64 -> 32
    assert params["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 64)
    assert params["model.layers.0.self_attn.q_proj.lora_B"].shape == (64, 4)
    assert params["model.layers.1.self_attn.v_proj.lora_B"].shape == (32, 4)
    assert lora_scaling(make_config().lora) == 2.0


def test_wrap_other_targets_and_bad_target():
    model, _ = wrapped_tiny(targets=("k_proj", "down_proj"))
    names = set(adapter_parameters(model))
    assert "model.layers.0.self_attn.k_proj.lora_A" in names
    assert "model.layers.1.mlp.down_proj.lora_B" in names
    assert not any("q_proj" in n or "v_proj" in n for n in names)
    base, _ = build_tiny_model(0)
    with pytest.raises(ValueError, match="target_modules"):
        wrap_lora(base, make_config("lora.target_modules=[no_such_module]").lora)


def test_wrap_freezes_base_and_initializes_from_seed(peft):
    model, _ = peft
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    state = adapter_state(model)
    init = init_adapter_state(model, seed=0)
    assert_same_tensors(state, init)


def test_adapter_state_is_a_detached_fp32_copy(peft):
    model, _ = peft
    state = adapter_state(model)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
               for t in state.values())
    name = "model.layers.0.self_attn.q_proj.lora_A"
    state[name].add_(1.0)
    assert not torch.equal(state[name], adapter_parameters(model)[name].detach())


def test_adapter_parameters_requires_lora():
    base, _ = build_tiny_model(0)
    with pytest.raises(ValueError, match="no LoRA parameters"):
        adapter_parameters(base)


# --- load_adapter_state -----------------------------------------------------------------------


def test_load_adapter_state_copies_in_place(peft):
    model, _ = peft
    before = adapter_parameters(model)
    ids = {k: id(p) for k, p in before.items()}
    ptrs = {k: p.data_ptr() for k, p in before.items()}
    new = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
           for i, (k, v) in enumerate(before.items())}
    load_adapter_state(model, new)
    after = adapter_parameters(model)
    assert {k: id(p) for k, p in after.items()} == ids
    assert {k: p.data_ptr() for k, p in after.items()} == ptrs
    assert_same_tensors(adapter_state(model), new)
    new[next(iter(new))].add_(5.0)  # the model holds a copy, not the caller's tensor
    assert not torch.equal(adapter_state(model)[next(iter(new))], new[next(iter(new))])


def test_load_adapter_state_rejects_bad_states(peft):
    model, _ = peft
    good = adapter_state(model)
    name = "model.layers.0.self_attn.q_proj.lora_A"
    missing = {k: v for k, v in good.items() if k != name}
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(model, missing)
    with pytest.raises(KeyError, match="unexpected"):
        load_adapter_state(model, {**good, "model.layers.0.self_attn.k_proj.lora_A": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_adapter_state(model, {**good, name: torch.zeros(5, 64)})
    # non-strict: a subset is fine, an unknown name is not
    load_adapter_state(model, {name: torch.ones(4, 64)}, strict=False)
    assert torch.equal(adapter_parameters(model)[name].detach(), torch.ones(4, 64))
    with pytest.raises(KeyError, match="unknown"):
        load_adapter_state(model, {"nope.lora_A": torch.zeros(1)}, strict=False)


def test_rejected_load_leaves_adapter_untouched(peft):
    """A state that fails validation must not be half-copied into the model."""
    model, _ = peft
    before = adapter_state(model)
    bad = {k: torch.full_like(v, 7.0) for k, v in before.items()}
    last = list(bad)[-1]
    bad[last] = torch.zeros(3, 3)  # wrong shape, checked after the others were copied
    with pytest.raises(ValueError):
        load_adapter_state(model, bad)
    assert_same_tensors(adapter_state(model), before)


# --- set_trainable -----------------------------------------------------------------------------


@pytest.mark.parametrize("mask, factors", [("ab", {"A", "B"}), ("a", {"A"}), ("b", {"B"}), ("none", set())])
def test_set_trainable_masks(peft, mask, factors):
    model, _ = peft
    trainable = set_trainable(model, mask)
    live = adapter_parameters(model)
    expected = {k for k in live if k[-1] in factors}
    assert {id(p) for p in trainable} == {id(live[k]) for k in expected}
    assert [id(p) for p in trainable] == [id(live[k]) for k in sorted(expected)]  # stable order
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == len(expected)
    assert all("lora_" in n for n in grads)
    assert {n for n in grads} == {n for n, p in model.named_parameters()
                                  if any(p is live[k] for k in expected)}


def test_set_trainable_bad_mask(peft):
    with pytest.raises(ValueError, match="train mask"):
        set_trainable(peft[0], "c")


# --- init_adapter_state ------------------------------------------------------------------------


def test_init_adapter_state_seeded(peft):
    model, _ = peft
    s1, s2, s3 = (init_adapter_state(model, seed) for seed in (3, 3, 4))
    assert_same_tensors(s1, s2)
    for name, t in s1.items():
        if name.endswith("lora_B"):
            assert torch.count_nonzero(t) == 0
        else:
            bound = 1 / math.sqrt(t.shape[1])
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
            assert t.std() > 0.3 * bound  # not degenerate
            assert not torch.equal(t, s3[name])
    s_rank = init_adapter_state(model, 3, rank=2)
    assert s_rank["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 64)
    assert s_rank["model.layers.0.self_attn.v_proj.lora_B"].shape == (32, 2)


def test_init_adapter_state_leaves_global_rng(peft):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_adapter_state(peft[0], 0)
    assert torch.equal(torch.rand(3), expected)


# --- local training ----------------------------------------------------------------------------


@pytest.fixture
def train_data(fed) -> EncodedExamples:
    """Eight real serialized rows of client 0, both classes when available."""
    return fed.clients[0].train.subset(np.arange(8))


def _random_b(model, seed=1, scale=0.05):
    """Adapter with non-zero B, so the first step's gradient also reaches A."""
    gen = torch.Generator().manual_seed(seed)
    state = init_adapter_state(model, seed)
    return {k: (torch.randn(v.shape, generator=gen) * scale if k.endswith("lora_B") else v)
            for k, v in state.items()}


def _train(model, data, mask="ab", steps=3, seed=0, weights=None, opt=None, **cfg_over):
    overrides = [f"train.{k}={'null' if v is None else v}" for k, v in cfg_over.items()]
    cfg = make_config(*overrides).train
    params = set_trainable(model, mask)
    return local_train(model, params, data, cfg, steps, np.random.default_rng(seed),
                       pad_id=model.config.pad_token_id, sample_weights=weights, optimizer_state=opt)


def _mean_loss(model, data) -> float:
    pairs = [(data.prompt_ids[i], data.verbalizer_ids[data.labels[i]]) for i in range(len(data))]
    with torch.no_grad():
        logp, count = target_logprobs(model, collate(pairs, model.config.pad_token_id, torch.device("cpu")))
    return float((-logp / count).mean())


def test_local_train_changes_every_adapter_tensor_and_no_base_weight(peft, train_data):
    model, _ = peft
    base = base_snapshot(model)
    before = adapter_state(model)
    result = _train(model, train_data, "ab", steps=3, lr=0.05)
    after = adapter_state(model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"adapter tensors not updated: {unchanged}"
    assert all(torch.count_nonzero(after[k]) > 0 for k in after if k.endswith("lora_B"))
    assert_same_tensors(base_snapshot(model), base)
    assert result.steps == 3 and result.examples == 12 and math.isfinite(result.loss)
    assert not model.training  # back in eval mode


def test_local_train_mask_b_keeps_a(peft, train_data):
    model, _ = peft
    load_adapter_state(model, _random_b(model))
    before = adapter_state(model)
    _train(model, train_data, "b", steps=3, lr=0.05)
    after = adapter_state(model)
    for k in before:
        assert torch.equal(before[k], after[k]) == k.endswith("lora_A"), k


def test_local_train_mask_a_keeps_b(peft, train_data):
    model, _ = peft
    load_adapter_state(model, _random_b(model))
    before = adapter_state(model)
    _train(model, train_data, "a", steps=2, lr=0.05)
    after = adapter_state(model)
    for k in before:
        assert torch.equal(before[k], after[k]) == k.endswith("lora_B"), k


def test_local_train_overfits_a_tiny_batch(peft, train_data):
    model, _ = peft
    batch = train_data.subset(np.arange(4))
    start = _mean_loss(model, batch)
    result = _train(model, batch, "ab", steps=20, lr=1e-2, batch_size=4)
    end = _mean_loss(model, batch)
    # A random model with rank-4 LoRA on q/v only cannot reach zero loss, but 20 Adam steps must
    # move the answer tokens' log-likelihood clearly (observed: 7.12 -> 6.29).
    assert end < start - 0.4, (start, end)
    assert result.loss < start  # mean training loss over the steps is below the starting loss


def test_micro_batching_matches_one_batch(peft, train_data):
    model, _ = peft
    data = train_data.subset(np.arange(4))
    init = _random_b(model)
    out = {}
    for micro in (None, 2, 1):
        load_adapter_state(model, init)
        _train(model, data, "ab", steps=1, batch_size=4, micro_batch_size=micro, max_grad_norm=None)
        grads = {k: p.grad.detach().clone() for k, p in adapter_parameters(model).items()}
        out[micro] = (adapter_state(model), grads)
    ref_params, ref_grads = out[None]
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for micro in (2, 1):
        params, grads = out[micro]
        for k in ref_params:
            torch.testing.assert_close(params[k], ref_params[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)


def test_zero_sample_weight_equals_dropping_the_row(peft, train_data):
    model, _ = peft
    init = _random_b(model)
    data4 = train_data.subset(np.arange(4))
    data3 = train_data.subset(np.arange(3))
    runs = {}
    for label, data, weights in [("weighted", data4, np.array([1.0, 1.0, 1.0, 0.0])), ("dropped", data3, None),
                                 ("uniform", data4, None)]:
        load_adapter_state(model, init)
        _train(model, data, "ab", steps=1, weights=weights, batch_size=4, max_grad_norm=None)
        runs[label] = (adapter_state(model),
                       {k: p.grad.detach().clone() for k, p in adapter_parameters(model).items()})
    for k in init:
        torch.testing.assert_close(runs["weighted"][1][k], runs["dropped"][1][k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(runs["weighted"][0][k], runs["dropped"][0][k], atol=1e-5, rtol=0)
    # and the zero weight really matters: all four rows give other gradients
    assert any(not torch.allclose(runs["uniform"][1][k], runs["dropped"][1][k], atol=1e-5) for k in init)


def test_all_zero_weights_rejected(peft, train_data):
    model, _ = peft
    with pytest.raises(ValueError, match="sum to zero"):
        _train(model, train_data.subset(np.arange(2)), steps=1, weights=np.zeros(2), batch_size=2)


def test_empty_client_rejected(peft, train_data):
    model, _ = peft
    with pytest.raises(ValueError, match="no training rows"):
        _train(model, train_data.subset(np.arange(0)), steps=1)


def test_optimizer_state_keep_and_reset(peft, train_data):
    model, _ = peft
    assert _train(model, train_data, steps=1, optimizer_state="reset").optimizer_state is None
    first = _train(model, train_data, steps=1, optimizer_state="keep").optimizer_state
    assert first is not None and set(first) == {"state", "param_groups"}
    steps = [float(s["step"]) for s in first["state"].values()]
    assert steps and all(s == 1 for s in steps)
    assert all(t.device.type == "cpu" for s in first["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor))
    second = _train(model, train_data, steps=2, optimizer_state="keep", opt=first).optimizer_state
    assert all(float(s["step"]) == 3 for s in second["state"].values())  # moments carried over


def test_batch_order_covers_rows_per_epoch():
    batches = batch_order(5, 2, 5, np.random.default_rng(0))
    assert [len(b) for b in batches] == [2] * 5
    flat = np.concatenate(batches)
    assert sorted(flat[:5].tolist()) == [0, 1, 2, 3, 4]  # first epoch: each row once
    again = batch_order(5, 2, 5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert [len(b) for b in batch_order(3, 8, 2, np.random.default_rng(0))] == [3, 3]
