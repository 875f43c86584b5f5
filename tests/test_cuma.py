"""CuMA's layer (model/cuma.py), profiles and export (model/cuma_io.py), and its config section."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import assert_same_tensors, base_snapshot, make_config, wrapped_tiny

from fedlora.config import ConfigError, DPConfig, RobustConfig
from fedlora.config.cuma import CumaConfig
from fedlora.model import build_tiny_model
from fedlora.model.cuma import (
    attach_cuma,
    aux_loss,
    balance_loss,
    cuma_controller,
    detach_cuma,
    route,
    set_profile,
    set_profile_lookup,
)
from fedlora.model.cuma_io import (
    ProfileEncoder,
    PromptProfiles,
    load_cuma,
    profile_text,
    save_cuma,
)
from fedlora.model.lora import (
    adapter_parameters,
    adapter_state,
    load_adapter_state,
    lora_layers,
    set_trainable,
)

GEN = torch.Generator().manual_seed(0)


def _batch(rows=3, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, :2] = 0  # left padding on the first row
    return ids, mask


def _randomize(model, seed=1, scale=0.3):
    """Every adapter tensor random (B = 0 would hide the experts and the routers' gradients)."""
    g = torch.Generator().manual_seed(seed)
    load_adapter_state(model, {k: torch.randn(v.shape, generator=g) * scale for k, v in adapter_state(model).items()})


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


# --- the two formulas, against hand computations ---------------------------------------------------


def test_topk_routing_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g, sel = route(p.log(), top_k=2, norm="softmax")
    e5, e3 = math.exp(0.5), math.exp(0.3)  # the authors' code: softmax over the kept probabilities
    assert torch.allclose(g, torch.tensor([[e5 / (e5 + e3), e3 / (e5 + e3), 0, 0]]), atol=1e-6)
    assert sel.tolist() == [[True, True, False, False]]
    g, _ = route(p.log(), top_k=2, norm="renorm")  # p_k / sum p_k
    assert torch.allclose(g, torch.tensor([[0.625, 0.375, 0, 0]]), atol=1e-6)
    g, sel = route(p.log(), top_k=2, routing="soft")
    assert torch.allclose(g, p, atol=1e-6) and bool(sel.all())
    g, _ = route(torch.tensor([[0.0, 2.0, 1.0]]), top_k=1)  # top-1: all weight on the argmax
    assert g.tolist() == [[0.0, 1.0, 0.0]]


def test_balance_loss_by_formula():
    # 3 tokens, 3 experts, k = 2; the last token is padding (mask 0) and must not count.
    g = torch.tensor([[[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.9, 0.0, 0.1]]])
    sel = g > 0
    mask = torch.tensor([[1, 1, 0]])
    freq = torch.tensor([1, 2, 1]) / (2 * 2)        # tokens selecting e / (tokens * k)
    prop = torch.tensor([0.6, 1.1, 0.3]) / 2         # mean g_e over the 2 real tokens
    expected = 3 * float((freq * prop).sum())
    assert balance_loss(g, sel, mask).item() == pytest.approx(expected, abs=1e-6)
    uniform = torch.full((1, 4, 3), 1 / 3)  # soft routing: LB = 1, a constant (no effect)
    assert balance_loss(uniform, torch.ones_like(uniform, dtype=torch.bool)).item() == pytest.approx(1.0)


# --- the layer ---------------------------------------------------------------------------------


def test_one_expert_without_router_is_plain_lora():
    plain, _ = wrapped_tiny()
    moe, _ = wrapped_tiny()
    _randomize(plain)
    load_adapter_state(moe, adapter_state(plain))
    ctl = attach_cuma(moe, CumaConfig(experts=1))
    assert ctl.routers == {} and set(adapter_state(moe)) == set(adapter_state(plain))
    ids, mask = _batch()
    a, b = _logits(plain, ids, mask), _logits(moe, ids, mask)
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    pa, pb = adapter_parameters(plain), adapter_parameters(moe)
    for name in pa:
        assert torch.equal(pa[name].grad, pb[name].grad), name


@pytest.mark.parametrize("shared_a", [True, False])
def test_layer_output_is_the_gated_sum_of_experts(shared_a):
    model, _ = wrapped_tiny()
    cfg = CumaConfig(experts=3, top_k=2, shared_a=shared_a, router_hidden=8)
    ctl = attach_cuma(model, cfg, seed=3)
    _randomize(model)
    name, layer = next(iter(lora_layers(model).items()))
    x = torch.randn(2, 5, layer.in_features, generator=GEN)
    z = torch.randn(2, ctl.profile_dim, generator=GEN)
    ctl.profile = z
    ctl.begin(None, None)
    y = layer(x)
    logits = ctl.routers[name.rsplit(".", 1)[0] + ".cuma_router_q_k_v"](x, z)
    g, _ = route(logits, 2)
    a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bs = [b0] + list(layer.cuma_B)
    as_ = [a0] * 3 if shared_a else [a0] + list(layer.cuma_A)
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * sum(
        g[..., e : e + 1] * (x @ as_[e].T @ bs[e].T) for e in range(3))
    assert torch.allclose(y, expected, atol=1e-5)


def test_routers_are_shared_by_group_and_named():
    model, _ = wrapped_tiny(targets=("q_proj", "v_proj", "o_proj"))
    ctl = attach_cuma(model, CumaConfig(experts=4, router_hidden=16))
    assert sorted(ctl.routers) == [f"model.layers.{i}.self_attn.cuma_router_{g}" for i in (0, 1) for g in ("o", "q_k_v")]
    names = set(adapter_state(model))
    assert "model.layers.0.self_attn.cuma_router_q_k_v.mlp.1.weight" in names
    assert "model.layers.0.self_attn.q_proj.cuma_B" in names
    set_profile(model, torch.zeros(ctl.profile_dim))
    _logits(model, *_batch())
    assert len(ctl.terms) == 4  # one balance term per router per forward, q and v reuse one gate
    detach_cuma(model)
    assert not any("cuma_" in n for n, _ in model.named_parameters()) and cuma_controller(model) is None


def test_gradients_reach_routers_and_experts_never_the_base():
    model, _ = wrapped_tiny()
    ctl = attach_cuma(model, CumaConfig(experts=4, top_k=2, router_hidden=16, profile_proj_dim=8))
    _randomize(model)
    before = base_snapshot(model)
    trainable = set_trainable(model, "abc")
    assert len(trainable) == len(adapter_parameters(model))
    set_profile(model, torch.randn(3, ctl.profile_dim, generator=GEN))
    ids, mask = _batch(rows=3, width=12)
    loss = _logits(model, ids, mask).logsumexp(-1).mean() + aux_loss(model)  # every position
    loss.backward()
    for name, p in adapter_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        if name.endswith("cuma_B"):  # every extra expert was chosen by some token
            assert all(p.grad[e].abs().sum() > 0 for e in range(p.shape[0])), name
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and "cuma_" not in n)
    torch.optim.SGD(trainable, lr=0.1).step()
    assert_same_tensors(before, base_snapshot(model))


def test_injected_balance_term_trains_routers_through_the_task_loss():
    # B = 0 everywhere: the task loss alone gives the routers no gradient; the injected term does.
    # Its own seeds (not the module's shared GEN, whose state depends on test order): when every
    # token of a router's layer picks the same top-k experts, freq is equal on them and the
    # balance term is constant in the gates (they sum to 1), so that router's gradient is truly
    # zero; these seeds give a batch with varied routing.
    model, _ = wrapped_tiny()
    ctl = attach_cuma(model, CumaConfig(experts=4, router_hidden=16))
    set_trainable(model, "abc")
    ctl.aux_mode = "inject"
    set_profile(model, torch.randn(ctl.profile_dim, generator=torch.Generator().manual_seed(0)))
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the routers' dropout
        _logits(model, *_batch())[:, -1].logsumexp(-1).mean().backward()
    router_grads = [p.grad for n, p in adapter_parameters(model).items() if "cuma_router" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_profile_is_required_unless_semantic_only():
    model, _ = wrapped_tiny()
    attach_cuma(model, CumaConfig(experts=2, router_hidden=8))
    with pytest.raises(ValueError, match="set_profile"):
        _logits(model, *_batch())
    attach_cuma(model, CumaConfig(experts=2, router_hidden=8, use_profile=False))  # replaces the first
    router = next(iter(cuma_controller(model).routers.values()))
    assert router.mlp[1].in_features == 64  # h only
    _logits(model, *_batch())


def test_profile_changes_routing_and_outputs():
    model, _ = wrapped_tiny()
    ctl = attach_cuma(model, CumaConfig(experts=4, router_hidden=16))
    _randomize(model)
    ids, mask = _batch()
    set_profile(model, torch.zeros(ctl.profile_dim))
    a = _logits(model, ids, mask)
    set_profile(model, torch.randn(ctl.profile_dim, generator=GEN) * 5)
    assert not torch.allclose(a, _logits(model, ids, mask))


# --- profiles and export ---------------------------------------------------------------------------


def test_profile_encoder_caches_and_prompt_lookup():
    model, tok = wrapped_tiny()
    attach_cuma(model, CumaConfig(experts=2, router_hidden=8))
    enc = ProfileEncoder(model, tok)
    texts = [profile_text({"age": "young", "sex": "male"}, ["age", "sex"]), "age: old; sex: female"]
    assert texts[0] == "age: young; sex: male"
    z = enc(texts + texts[:1])
    assert z.shape == (3, 64) and torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    assert len(enc.cache) == 2
    lookup = PromptProfiles(verbalizer_ids=[[7], [8, 9]])
    lookup.add([[1, 2, 3], [4, 5]], z[:2])
    ids = torch.tensor([[0, 1, 2, 3, 8, 9], [0, 0, 0, 4, 5, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    assert torch.equal(lookup(ids, mask), z[:2])
    set_profile_lookup(model, lookup)
    _logits(model, ids, mask)
    with pytest.raises(KeyError, match="no profile"):
        lookup(torch.tensor([[6, 6]]), None)


@pytest.mark.parametrize("shared_a", [True, False])
def test_export_reload_gives_identical_logits(tmp_path, shared_a):
    model, tok = wrapped_tiny()
    lora = make_config().lora
    ctl = attach_cuma(model, CumaConfig(experts=3, router_hidden=16, shared_a=shared_a, profile_proj_dim=8))
    _randomize(model)
    z = ProfileEncoder(model, tok)(["group: a"])[0]
    set_profile(model, z)
    ids, mask = _batch()
    want = _logits(model, ids, mask)
    folder = save_cuma(model, tmp_path / "cuma", lora, base_model="tiny", profiles={"group: a": z})
    assert sorted(p.name for p in folder.iterdir()) == ["cuma_adapter.safetensors", "cuma_config.json",
                                                        "cuma_profiles.safetensors"]
    base, _ = build_tiny_model(0)
    loaded, profiles = load_cuma(base, folder)
    set_profile(loaded, profiles["group: a"])
    assert torch.equal(want, _logits(loaded, ids, mask))
    assert cuma_controller(loaded).cfg == ctl.cfg


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("cuma.top_k=9", "cuma.top_k=9 must be in"),
    ("cuma.routing=hard", "cuma.routing: unknown value"),
    ("cuma.experts=0", "cuma.experts must be >= 1"),
    ("cuma.lambda_aux=-1", "cuma.lambda_aux must be >= 0"),
    ("cuma.router_groups=[[q_proj, k_proj], [q_proj]]", "q_proj is in two groups"),
])
def test_config_errors_name_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make_config(override)


def test_federated_cuma_needs_profile_columns_or_client_profiles():
    with pytest.raises(ConfigError, match="cuma.profile_columns"):
        make_config("fl.method=cuma")
    assert make_config("fl.method=cuma", "cuma.profile_source=client").cuma.profile_source == "client"
    cfg = make_config("cuma.experts=4", "cuma.top_k=1", "cuma.routing=soft")
    assert (cfg.cuma.experts, cfg.cuma.routing) == (4, "soft")


# --- federated (fl/methods/cuma.py through the shared runtime) ----------------------------------


def test_federated_row_profiles_and_personal_routers(fed):
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import build_method

    cfg = fed.cfg
    fed.cfg = make_config("cuma.experts=3", "cuma.router_hidden=8", "cuma.profile_columns=[mean radius]")
    try:
        sim = Simulator(fed, build_method("cuma", {"personal_routers": True}), seed=0)
        lookup = cuma_controller(fed.model).lookup
        assert len(lookup.table) >= sum(len(c.train) for c in fed.clients) // 2  # distinct prompts
        result = sim.run()
    finally:
        fed.cfg = cfg
    assert cuma_controller(fed.model) is None  # removed after the run: the shared model is plain PEFT
    server, clients = result.state.server, result.state.clients
    assert not any("cuma_router" in k for k in server) and any(k.endswith("cuma_B") for k in server)
    assert all(c and all("cuma_router" in k for k in c) for c in clients)
    assert not torch.equal(clients[0][next(iter(clients[0]))], clients[1][next(iter(clients[1]))])
    assert result.final(0)["split"] == "test" and result.final("global") is None


# --- CuMA through the shared server chain: robust rules and DP-FedAvg ---------------------------


def _cuma_fed(fed, *overrides, robust=None, dp=None, rounds=1):
    """The session Federation under a CuMA config (+ robust / dp sections); profiles cached across calls."""
    cfg = make_config("cuma.experts=3", "cuma.router_hidden=8", "cuma.profile_columns=[mean radius]",
                      f"fl.rounds={rounds}", *overrides)
    cfg = dataclasses.replace(cfg, robust=RobustConfig(**(robust or {})),
                              dp=DPConfig(enabled=True, **dp) if dp is not None else DPConfig())
    out = dataclasses.replace(fed, cfg=cfg)
    out.__dict__["_cuma_profiles"] = fed.__dict__.setdefault("_cuma_profiles", {})  # encode once
    return out


def _spy_transform(monkeypatch, sim, name):
    """Record (input updates, reference, output updates) of the combine transform `name` each round."""
    transform = sim.server.combine.get(name)
    seen, apply = [], transform.apply

    def spy(updates, st, ctx):
        out, st = apply(updates, st, ctx)
        seen.append(([u.tensors for u in updates], ctx.reference(updates[0].client_id), out))
        return out, st

    monkeypatch.setattr(transform, "apply", spy)
    return seen


def _flat(tensors, keys):
    return torch.cat([tensors[k].to(torch.float64).reshape(-1) for k in keys])


def _assert_server_is(server, ref, keys, step):
    """server == float32(download + step), the float64 `step` flat over sorted `keys` (DPMean's rounding)."""
    want = (_flat(ref, keys) + step).to(torch.float32)
    torch.testing.assert_close(_flat(server, keys).to(torch.float32), want, atol=6e-8, rtol=0)  # ~1 ulp


def _all_finite(tensors):
    return all(bool(torch.isfinite(v).all()) for v in tensors.values())


def test_federated_median_with_a_sign_flipper_aggregates_routers_and_experts(fed, monkeypatch):
    """3 clients, 1 sign flipper (scale 100), median with f = 1: the server's every CuMA tensor is
    download + the coordinate-wise median of the three updates, so it lies between the two honest ones."""
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import build_method

    robust = {"aggregator": ["median"], "f": 1, "byzantine": 1, "attack": "sign_flip",
              "attack_args": {"scale": 100.0}}
    sim = Simulator(_cuma_fed(fed, robust=robust), build_method("cuma"), seed=0)
    seen = _spy_transform(monkeypatch, sim, "aggregator")
    result = sim.run()
    (uploads, ref, _), = seen
    server = result.state.server
    assert len(uploads) == 3 and _all_finite(server)
    server_row = next(r for r in result.rows if r["client"] == "server")
    assert server_row["byzantine_sampled"] == sim.byzantine and server_row["num_rejected"] == 0
    cuma = sorted(k for k in server if "cuma_" in k)
    assert any("cuma_router" in k for k in cuma) and any(k.endswith("cuma_B") for k in cuma)
    deltas = [{k: u[k] - ref[k] for k in server} for u in uploads]  # honest clients first, the attacker last
    honest, byz = deltas[:2], deltas[2]
    moved = [k for k in cuma if any(d[k].abs().max() > 0 for d in honest)]
    assert any("cuma_router" in k for k in moved) and any(k.endswith("cuma_B") for k in moved)
    for k in moved:
        torch.testing.assert_close(byz[k], -100.0 * (honest[0][k] + honest[1][k]) / 2)  # the attack reaches k
        median = torch.stack([d[k] for d in deltas]).median(dim=0).values
        torch.testing.assert_close(server[k], ref[k] + median, atol=1e-7, rtol=0)
        lo, hi = torch.minimum(honest[0][k], honest[1][k]), torch.maximum(honest[0][k], honest[1][k])
        assert bool(((server[k] - ref[k] >= lo - 1e-7) & (server[k] - ref[k] <= hi + 1e-7)).all()), k
    # Without the rule, the method's own mean is dragged ~100x the honest step away.
    plain = Simulator(_cuma_fed(fed, robust={k: v for k, v in robust.items() if k not in ("aggregator", "f")}),
                      build_method("cuma"), seed=0).run().state.server
    far = max(float((plain[k] - ref[k]).abs().max()) for k in moved)
    near = max(float((server[k] - ref[k]).abs().max()) for k in moved)
    assert far > 10 * near


def test_federated_dp_clips_the_whole_update_including_routers_and_experts(fed, monkeypatch):
    """z = 0, C below every update's norm: the server adds (1/m) sum_i Delta_i C / ||Delta_i||, the norm
    over the flattened upload (LoRA and every cuma_ tensor), so the server step has norm <= C."""
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import build_method

    clip = 0.01  # the updates' norms are about 0.3
    sim = Simulator(_cuma_fed(fed, dp={"noise_multiplier": 0.0, "clip": clip}), build_method("cuma"), seed=0)
    seen = _spy_transform(monkeypatch, sim, "dp")
    result = sim.run()
    (uploads, ref, _), = seen
    server, keys = result.state.server, sorted(result.state.server)
    assert any("cuma_router" in k for k in keys) and any(k.endswith("cuma_B") for k in keys)
    assert sorted(uploads[0]) == keys and _all_finite(server)
    deltas = [_flat(u, keys) - _flat(ref, keys) for u in uploads]
    norms = [float(d.norm()) for d in deltas]
    assert len(deltas) == sim.dp.m == 3 and min(norms) > 10 * clip  # every update is clipped
    # The cuma_ part alone is above C too: clipping only the LoRA part would leave it unbounded.
    cuma_at = torch.cat([torch.full((ref[k].numel(),), "cuma_" in k) for k in keys])
    assert all(float(d[cuma_at].norm()) > clip for d in deltas)
    expected = sum(d * (clip / d.norm()) for d in deltas) / 3
    _assert_server_is(server, ref, keys, expected)
    assert float((_flat(server, keys) - _flat(ref, keys)).norm()) <= clip * (1 + 1e-3)  # float32 rounding
    # With noise (z = 1) the run completes: finite tensors, a finite epsilon.
    noisy = Simulator(_cuma_fed(fed, dp={"noise_multiplier": 1.0, "clip": 0.05}, rounds=2),
                      build_method("cuma"), seed=0).run()
    rows = [r for r in noisy.rows if r["client"] == "server"]
    assert _all_finite(noisy.state.server) and len(rows) == 2 and math.isfinite(rows[-1]["epsilon"])
    assert not torch.equal(_flat(noisy.state.server, keys), _flat(server, keys))


def test_federated_dp_without_noise_or_clipping_is_the_plain_cuma_round(fed, monkeypatch):
    """z = 0, C = inf: DP-FedAvg is the uniform mean of the same uploads (it ignores example counts by
    design, docs/dp.md); on uploads with equal counts that is CuMA's own aggregate."""
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import ClientUpdate, build_method

    dp_sim = Simulator(_cuma_fed(fed, dp={"noise_multiplier": 0.0, "clip": math.inf}), build_method("cuma"), seed=0)
    dp_seen = _spy_transform(monkeypatch, dp_sim, "dp")
    dp_server = dp_sim.run().state.server
    plain_sim = Simulator(_cuma_fed(fed), build_method("cuma"), seed=0)
    plain_seen = []
    aggregate = plain_sim.method.aggregate
    monkeypatch.setattr(plain_sim.method, "aggregate",
                        lambda server, ups: plain_seen.append([u.tensors for u in ups]) or aggregate(server, ups))
    plain_server = plain_sim.run().state.server
    (dp_uploads, ref, _), = dp_seen
    (plain_uploads,) = plain_seen
    assert set(dp_server) == set(plain_server) and any("cuma_router" in k for k in dp_server)
    for a, b in zip(dp_uploads, plain_uploads, strict=True):  # the same training, bitwise
        assert_same_tensors(a, b)
    for k in dp_server:
        uniform = ref[k] + sum(u[k] - ref[k] for u in dp_uploads) / 3
        torch.testing.assert_close(dp_server[k], uniform, atol=1e-7, rtol=1e-6)
    # Equal example counts: DP's result is exactly what the plain CuMA aggregate gives.
    sim = Simulator(_cuma_fed(fed, dp={"noise_multiplier": 0.0, "clip": math.inf}), build_method("cuma"), seed=0)
    state = sim.initial_state()
    ups = [ClientUpdate(i, u, 9) for i, u in enumerate(plain_uploads)]
    expected = sim.method.aggregate(state.server, ups)
    got = sim.aggregate(state, ups, 1)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-7, rtol=1e-6)


def test_federated_personal_routers_with_dp_send_and_clip_experts_only(fed, monkeypatch):
    """personal_routers + DP: no router or projection tensor is in any payload; the experts' update
    is clipped to C on its own (z = 0 so the result is a known answer); routers stay and train locally."""
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import build_method
    from fedlora.fl.payload import decode

    clip = 0.01
    sim = Simulator(_cuma_fed(fed, dp={"noise_multiplier": 0.0, "clip": clip}),
                    build_method("cuma", {"personal_routers": True}), seed=0)
    initial = sim.initial_state().clients
    sent, receive = [], sim.server.receive

    def spy(cid, payload, *args, **kwargs):
        sent.append(set(decode(payload)[0]) if isinstance(payload, (bytes, bytearray)) else set(payload))
        return receive(cid, payload, *args, **kwargs)

    monkeypatch.setattr(sim.server, "receive", spy)
    seen = _spy_transform(monkeypatch, sim, "dp")
    result = sim.run()
    (uploads, ref, _), = seen
    server, keys = result.state.server, sorted(result.state.server)
    assert len(sent) == 3 and all(s == set(keys) for s in sent)
    assert not any("cuma_router" in k or k.startswith("cuma_proj") for s in sent for k in s)
    assert any(k.endswith("cuma_B") for k in keys) and _all_finite(server)
    deltas = [_flat(u, keys) - _flat(ref, keys) for u in uploads]
    assert min(float(d.norm()) for d in deltas) > 10 * clip
    expected = sum(d * (clip / d.norm()) for d in deltas) / 3
    _assert_server_is(server, ref, keys, expected)
    for before, after in zip(initial, result.state.clients, strict=True):
        assert set(after) == set(before) and after and all("cuma_router" in k for k in after)
        assert _all_finite(after) and any(not torch.equal(after[k], before[k]) for k in after)
