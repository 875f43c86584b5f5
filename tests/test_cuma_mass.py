"""CuMA's per-expert weighting by routing mass (fl.method_args.expert_weights=routing_mass; ours).

Known answers on small tensors, the tracked mass against the gates it averages, limit cases (one
client, equal masses), hostile masses, refusals, and a simulator run through the payload schema.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_config, wrapped_tiny

from fedlora.config import ConfigError, DPConfig, RobustConfig
from fedlora.config.cuma import CumaConfig
from fedlora.fl.cuma_setup import tracked_routing_mass
from fedlora.fl.methods import build_method
from fedlora.fl.methods.base import ClientUpdate, weighted_mean
from fedlora.fl.methods.cuma import ROUTING_MASS
from fedlora.model.cuma import attach_cuma, cuma_controller, route
from fedlora.model.lora import adapter_state, load_adapter_state

M = "layer.q_proj"


def _update(cid, n, seed, mass=None, own_a=False):
    """One client's upload of a 3-expert module: lora_A [2, 4], lora_B [5, 2], cuma_B [2, 5, 2]."""
    g = torch.Generator().manual_seed(seed)
    t = {f"{M}.lora_A": torch.randn(2, 4, generator=g), f"{M}.lora_B": torch.randn(5, 2, generator=g),
         f"{M}.cuma_B": torch.randn(2, 5, 2, generator=g), "layer.cuma_router_q.mlp.1.weight": torch.randn(3, 4, generator=g)}
    if own_a:
        t[f"{M}.cuma_A"] = torch.randn(2, 2, 4, generator=g)
    if mass is not None:
        t[ROUTING_MASS + M] = torch.tensor(mass)
    return ClientUpdate(cid, t, n)


def _method():
    return build_method("cuma", {"expert_weights": "routing_mass"})


def _server(update):
    return {k: v for k, v in update.tensors.items() if not k.startswith(ROUTING_MASS)}


def test_known_answer_on_two_clients():
    """n = (1, 3), masses (0.5, 0.5, 0) and (0.2, 0.2, 0.6): expert 0 weights (0.5, 0.6)/1.1, expert 2
    only client 1; the shared A and the router keep n weights (1/4, 3/4)."""
    u0, u1 = _update(0, 1, 0, [0.5, 0.5, 0.0]), _update(1, 3, 1, [0.2, 0.2, 0.6])
    out = _method().aggregate(_server(u0), [u0, u1])
    t0, t1 = u0.tensors, u1.tensors
    w0 = (0.5 / 1.1, 0.6 / 1.1)
    torch.testing.assert_close(out[f"{M}.lora_B"], w0[0] * t0[f"{M}.lora_B"] + w0[1] * t1[f"{M}.lora_B"])
    torch.testing.assert_close(out[f"{M}.cuma_B"][0], w0[0] * t0[f"{M}.cuma_B"][0] + w0[1] * t1[f"{M}.cuma_B"][0])
    torch.testing.assert_close(out[f"{M}.cuma_B"][1], t1[f"{M}.cuma_B"][1])  # client 0 never routed to expert 2
    for key in (f"{M}.lora_A", "layer.cuma_router_q.mlp.1.weight"):
        torch.testing.assert_close(out[key], 0.25 * t0[key] + 0.75 * t1[key])
    assert not any(k.startswith(ROUTING_MASS) for k in out)


def test_independent_a_is_weighted_with_its_expert():
    u0, u1 = _update(0, 2, 0, [1.0, 0.0, 0.0], own_a=True), _update(1, 2, 1, [0.0, 0.5, 0.5], own_a=True)
    out = _method().aggregate(_server(u0), [u0, u1])
    torch.testing.assert_close(out[f"{M}.lora_A"], u0.tensors[f"{M}.lora_A"])  # expert 0: client 0 alone
    torch.testing.assert_close(out[f"{M}.cuma_A"], u1.tensors[f"{M}.cuma_A"])  # experts 1, 2: client 1 alone


def test_limit_cases_one_client_and_equal_masses_are_fedavg():
    one = _update(0, 7, 0, [0.9, 0.1, 0.0])
    out = _method().aggregate(_server(one), [one])
    assert all(torch.equal(out[k], v) for k, v in _server(one).items())
    ups = [_update(i, n, i, [0.3, 0.3, 0.4]) for i, n in enumerate((1, 4, 2))]
    plain = weighted_mean(ups, keys=list(_server(ups[0])))
    out = _method().aggregate(_server(ups[0]), ups)
    for k in plain:
        torch.testing.assert_close(out[k], plain[k], atol=1e-6, rtol=1e-6)


def test_no_client_routed_to_an_expert_falls_back_to_example_weights():
    u0, u1 = _update(0, 1, 0, [1.0, 0.0, 0.0]), _update(1, 3, 1, [1.0, 0.0, 0.0])
    out = _method().aggregate(_server(u0), [u0, u1])
    want = 0.25 * u0.tensors[f"{M}.cuma_B"] + 0.75 * u1.tensors[f"{M}.cuma_B"]
    torch.testing.assert_close(out[f"{M}.cuma_B"], want)


def test_a_hostile_mass_cannot_inflate_its_weight():
    """Negative entries count as 0 and a mass is normalised: 1000x mass weighs what 1x does."""
    honest = _update(1, 1, 1, [0.5, 0.5, 0.0])
    loud, quiet = _update(0, 1, 0, [-5.0, 1000.0, 0.0]), _update(0, 1, 0, [0.0, 1.0, 0.0])
    a = _method().aggregate(_server(honest), [loud, honest])
    b = _method().aggregate(_server(honest), [quiet, honest])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_upload_carries_the_mass_or_a_uniform_one_and_personal_routers_keep_theirs():
    u = _update(0, 1, 0, [0.2, 0.3, 0.5])
    sent, _ = _method().upload(dict(u.tensors), {})
    torch.testing.assert_close(sent[ROUTING_MASS + M], torch.tensor([0.2, 0.3, 0.5]))
    sent, _ = _method().upload(_server(u), {})  # before any training: the schema's upload
    torch.testing.assert_close(sent[ROUTING_MASS + M], torch.full((3,), 1 / 3))
    personal = build_method("cuma", {"expert_weights": "routing_mass", "personal_routers": True})
    sent, own = personal.upload(dict(u.tensors), {})
    assert ROUTING_MASS + M in sent and not any("cuma_router" in k for k in sent)
    assert list(own) == ["layer.cuma_router_q.mlp.1.weight"]
    sent, _ = build_method("cuma").upload(dict(u.tensors), {})  # examples: no mass sent
    assert not any(k.startswith(ROUTING_MASS) for k in sent)
    with pytest.raises(ValueError, match="expert_weights"):
        build_method("cuma", {"expert_weights": "mass"})


def test_tracked_mass_is_the_mean_gate_over_non_pad_training_tokens():
    model, _ = wrapped_tiny(targets=("q_proj", "k_proj", "v_proj"))
    cfg = CumaConfig(experts=4, top_k=2, router_hidden=8, use_profile=False)
    ctl = attach_cuma(model, cfg, seed=0)
    g = torch.Generator().manual_seed(3)
    load_adapter_state(model, {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in adapter_state(model).items()})
    ids = torch.randint(3, 200, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    seen = {}
    router = next(iter(ctl.routers))
    hook = ctl.routers[router].register_forward_hook(lambda m, a, out: None if "logits" in seen else
                                                     seen.update(logits=out.detach()))
    with tracked_routing_mass(model, True) as mass:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        with torch.no_grad():  # an evaluation forward inside the block is not counted
            model(input_ids=ids, attention_mask=torch.ones_like(mask), use_cache=False)
    hook.remove()
    gates, _ = route(seen["logits"], 2)
    want = (gates * mask[..., None]).sum((0, 1)) / mask.sum()
    module = next(m for m, grp in ctl.module_groups.items() if grp == router)
    torch.testing.assert_close(mass[ROUTING_MASS + module], want.float())
    assert set(mass) == {ROUTING_MASS + m for m in ctl.module_groups}
    assert all(abs(float(v.sum()) - 1) < 1e-5 for v in mass.values())
    assert cuma_controller(model).mass is None  # tracking ends with the block
    with tracked_routing_mass(model, False) as off:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert off == {}


def _mass_fed(fed, robust=None, dp=None, clients=3):
    cfg = make_config("cuma.experts=3", "cuma.router_hidden=8", "cuma.profile_columns=[mean radius]", "fl.rounds=2")
    cfg = dataclasses.replace(cfg, robust=RobustConfig(**(robust or {})),
                              dp=DPConfig(enabled=True, **dp) if dp is not None else DPConfig())
    out = dataclasses.replace(fed, cfg=cfg, clients=fed.clients[:clients])
    out.__dict__["_cuma_profiles"] = {}
    return out


@pytest.mark.parametrize("robust,dp", [({"aggregator": ["median"], "f": 1}, None),
                                       (None, {"noise_multiplier": 0.0, "clip": 1.0})])
def test_robust_chains_and_dp_are_refused_with_routing_mass(fed, robust, dp):
    from fedlora.fl.engine import Simulator

    with pytest.raises(ConfigError, match="expert_weights=routing_mass; set it to .examples."):
        Simulator(_mass_fed(fed, robust, dp), _method(), seed=0)


def test_simulator_round_sends_tracked_masses_and_combines_them(fed, monkeypatch):
    """Two real rounds on the tiny federation: every upload passes the schema, carries a mass per
    routed module that sums to 1, and the server state is `_mass_weighted` of those uploads."""
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods.cuma import CuMA

    seen = []
    aggregate = CuMA.aggregate

    def spy(self, server, updates):
        out = aggregate(self, server, updates)
        seen.append(([u.tensors for u in updates], out))
        return out

    monkeypatch.setattr(CuMA, "aggregate", spy)
    result = Simulator(_mass_fed(fed), _method(), seed=0).run()
    assert len(seen) == 2 and all(not r.get("rejected") for r in result.rows if r["client"] == "server")
    uploads, out = seen[-1]
    masses = [{k: v for k, v in u.items() if k.startswith(ROUTING_MASS)} for u in uploads]
    assert all(masses) and all(abs(float(v.sum()) - 1) < 1e-5 for m in masses for v in m.values())
    assert not torch.equal(next(iter(masses[0].values())), next(iter(masses[1].values())))
    plain = weighted_mean([ClientUpdate(i, u, 1) for i, u in enumerate(uploads)], keys=list(out))
    assert any(not torch.equal(out[k], plain[k]) for k in out if k.endswith("cuma_B"))
    assert all(torch.equal(result.state.server[k], out[k]) for k in out)
