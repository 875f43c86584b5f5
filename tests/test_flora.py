"""FLoRA (arXiv 2409.05976): exact stacking, the merged base, its bitwise restore, heterogeneous ranks."""

from __future__ import annotations

import pytest
import torch

import fedlora.fl.client_runtime as client_runtime
from conftest import assert_same_tensors, base_snapshot, strip_times
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import ClientUpdate, build_method, method_class
from fedlora.fl.methods.flora import stack, trim_zero_rank
from fedlora.fl.payload import encode
from fedlora.model.lora import base_weights, lora_layers, lora_scaling


def _factors(gen, ranks, d_in=6, d_out=5):
    return [(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)) for r in ranks]


def _recording(method, name):
    """Wrap method.<name> so every call's arguments are kept (the method itself is unchanged)."""
    calls, inner = [], getattr(method, name)

    def wrapper(*args):
        calls.append(args)
        return inner(*args)

    setattr(method, name, wrapper)
    return calls


# --- the server's algebra on small matrices ----------------------------------------------------


@pytest.mark.parametrize("ranks", [[3, 3, 3], [1, 2, 4], [4]])
def test_stack_is_exact_sum_of_products(ranks):
    gen = torch.Generator().manual_seed(0)
    factors = _factors(gen, ranks)
    p = torch.rand(len(ranks), generator=gen)
    p = (p / p.sum()).tolist()
    a, b = stack(factors, p)
    assert a.shape == (sum(ranks), 6) and b.shape == (5, sum(ranks))
    expected = sum(w * (b_i.double() @ a_i.double()) for (a_i, b_i), w in zip(factors, p))
    torch.testing.assert_close(b.double() @ a.double(), expected, atol=1e-6, rtol=0)


def test_aggregate_merges_weighted_products_with_rank_scaling():
    """D += sum_i p_i (r / r_i) B_i A_i; the stack is kept for the downlink; other keys untouched."""
    m = build_method("flora", {"ranks": [1, 2, 4]})
    init = {"l.lora_A": torch.zeros(4, 6), "l.lora_B": torch.zeros(5, 4)}
    server = m.init_server(init)
    assert m.download(server, 0) == {}  # round 1: nothing stacked yet
    gen = torch.Generator().manual_seed(1)
    factors = _factors(gen, [1, 2, 4])
    counts = [10, 30, 60]
    ups = [ClientUpdate(i, {"l.lora_A": a, "l.lora_B": b}, n) for i, ((a, b), n) in enumerate(zip(factors, counts))]
    out = m.aggregate(server, ups)
    expected = sum(n / 100 * 4 / r * (b.double() @ a.double()) for (a, b), n, r in zip(factors, counts, [1, 2, 4]))
    torch.testing.assert_close(out["l.delta"].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["l.lora_B"].double() @ out["l.lora_A"].double(), expected, atol=1e-6, rtol=0)
    again = m.aggregate(out, ups)  # cumulative over rounds
    torch.testing.assert_close(again["l.delta"].double(), 2 * expected, atol=1e-6, rtol=0)
    assert set(m.global_adapter(out)) == set(init)
    assert all(not t.any() for t in m.global_adapter(out).values())  # evaluation: zero adapter


def test_aggregate_rejects_rank_above_client_rank():
    m = build_method("flora", {"ranks": [1, 4]})
    server = m.init_server({"l.lora_A": torch.zeros(4, 3), "l.lora_B": torch.zeros(2, 4)})
    bad = ClientUpdate(0, {"l.lora_A": torch.ones(2, 3), "l.lora_B": torch.ones(2, 2)}, 1)
    with pytest.raises(ValueError, match="client 0"):
        m.aggregate(server, [bad])


def test_trim_drops_only_zero_components():
    a, b = torch.ones(4, 3), torch.ones(2, 4)
    a[2:] = 0
    b[:, 2:] = 0
    ta, tb = trim_zero_rank(a, b)
    assert ta.shape == (2, 3) and tb.shape == (2, 2) and torch.equal(tb @ ta, b @ a)
    b[:, 3] = 1  # a live B column keeps its component (and the zero one before it)
    assert trim_zero_rank(a, b)[0].shape == (4, 3)


def test_downlink_grows_with_the_number_of_clients():
    m = build_method("flora")
    init = {"l.lora_A": torch.zeros(4, 16), "l.lora_B": torch.zeros(16, 4)}
    gen = torch.Generator().manual_seed(2)
    sizes = []
    for k in (1, 2, 3):
        factors = _factors(gen, [4] * k, 16, 16)
        ups = [ClientUpdate(i, {"l.lora_A": a, "l.lora_B": b}, 1) for i, (a, b) in enumerate(factors)]
        sent = m.download(m.aggregate(m.init_server(init), ups), 0)
        assert sent["l.lora_A"].shape == (4 * k, 16)
        sizes.append(len(encode(sent)))
    assert sizes[0] < sizes[1] < sizes[2]


def test_options_are_validated(fed):
    with pytest.raises(ValueError, match="positive integers"):
        build_method("flora", {"ranks": [2, 0, 1]})
    with pytest.raises(ValueError, match="one per client"):
        Simulator(fed, build_method("flora", {"ranks": [2, 2]})).initial_state()
    with pytest.raises(ValueError, match="exceeds lora.r"):
        Simulator(fed, build_method("flora", {"ranks": [2, 9, 1]})).initial_state()


def test_other_methods_leave_the_base_alone():
    for name in ("fedit", "local", "centralized"):
        m = build_method(name)
        assert m.base_delta({}) is None and m.client_rank(0) is None and not method_class(name).fresh_each_round


# --- the simulator: merged base, restore, fresh adapters, ranks --------------------------------


def test_one_round_merges_weighted_products_into_the_base(fed):
    """During evaluation W = W0 + (alpha / r) sum_i p_i B_i A_i, computed here from the uploads."""
    sim = Simulator(fed, "flora", seed=0)
    model = fed.model
    w0 = base_weights(model)
    ups = _recording(sim.method, "aggregate")
    seen = {}
    evaluate = sim.evaluate

    def spy(state, timer):
        seen.update(base_weights(model))
        return evaluate(state, timer)

    sim.evaluate = spy
    assert fed.cfg.fl.eval_every == 1  # round 1 is evaluated
    state = sim.initial_state()
    sim.run_round(state)
    (_, updates), = ups
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = n / n.sum()
    assert [u.num_examples for u in updates] == [len(sim.train_sets[u.client_id]) for u in updates]
    s = lora_scaling(fed.cfg.lora)
    for name in lora_layers(model):
        delta = sum(p_i * (u.tensors[f"{name}.lora_B"].double() @ u.tensors[f"{name}.lora_A"].double())
                    for p_i, u in zip(p, updates))
        assert delta.abs().max() > 0
        torch.testing.assert_close(seen[name].double(), w0[name].double() + s * delta, atol=1e-6, rtol=0)
    assert_same_tensors(base_weights(model), w0)  # restored after the round


def test_fresh_adapter_each_round_and_downlink_bytes(fed):
    sim = Simulator(fed, "flora", seed=0)
    starts = []
    load = client_runtime.load_adapter_state

    def spy(model, state, *a, **k):
        starts.append({n: t.clone() for n, t in state.items()})
        return load(model, state, *a, **k)

    client_runtime.load_adapter_state = spy
    try:
        result = sim.run()
    finally:
        client_runtime.load_adapter_state = load
    train_starts = [s for s in starts if any(t.any() for n, t in s.items() if n.endswith("lora_A"))]
    assert len(train_starts) == fed.cfg.fl.rounds * fed.num_clients
    assert all(not t.any() for s in train_starts for n, t in s.items() if n.endswith("lora_B"))  # B = 0
    a_first = [next(iter(s.values())) for s in train_starts]
    assert all(not torch.equal(a_first[i], a_first[j]) for i in range(len(a_first)) for j in range(i))
    server = [r for r in result.rows if r["client"] == "server"]
    assert server[0]["bytes_down"] == 0  # nothing stacked before round 1
    stacked = len(encode(sim.method.download(result.state.server, 0)))  # same shapes as round 1's stack
    assert server[1]["bytes_down"] == stacked * len(server[1]["sampled"])


def test_base_restored_bitwise_after_run_and_after_an_error(fed):
    before = base_snapshot(fed.model)
    Simulator(fed, "flora", seed=0).run()
    assert_same_tensors(before, base_snapshot(fed.model))

    sim = Simulator(fed, "flora", seed=0)
    aggregate, calls = sim.method.aggregate, []

    def failing(server, updates):
        calls.append(1)
        if len(calls) == 2:  # round 2: the base holds round 1's merge when this raises
            assert sim._base_backup is not None
            raise RuntimeError("boom")
        return aggregate(server, updates)

    sim.method.aggregate = failing
    with pytest.raises(RuntimeError, match="boom"):
        sim.run()
    assert_same_tensors(before, base_snapshot(fed.model))


def test_heterogeneous_ranks_zero_padding_and_scaling(fed, monkeypatch):
    ranks = [1, 2, 4]
    method = build_method("flora", {"ranks": ranks})
    sim = Simulator(fed, method, seed=0)
    trained = _recording(method, "upload")
    scalings = []
    local_train = client_runtime.local_train

    def spy(model, *a, **k):
        scalings.append({layer.scaling["default"] for layer in lora_layers(model).values()})
        return local_train(model, *a, **k)

    monkeypatch.setattr(client_runtime, "local_train", spy)
    state = sim.initial_state()
    sampled = sim.sample_clients(1)
    rows = sim.run_round(state)
    server = next(r for r in rows if r["client"] == "server")
    assert server["num_rejected"] == 0 and server["replies"] == len(sampled)  # rank-r_i payloads validate
    alpha = fed.cfg.lora.alpha
    assert scalings == [{alpha / ranks[c]} for c in sampled]  # training sees alpha / r_i
    assert all(layer.scaling["default"] == lora_scaling(fed.cfg.lora) for layer in lora_layers(fed.model).values())
    for cid, (adapter, _) in zip(sampled, trained):
        r_i = ranks[cid]
        for name, t in adapter.items():
            pad, live = (t[r_i:], t[:r_i]) if name.endswith("lora_A") else (t[:, r_i:], t[:, :r_i])
            assert pad.numel() == 0 or not pad.any(), f"client {cid} {name}: padding moved"
            assert live.any()
    ups = {r["client"]: r["bytes_up"] for r in rows if "bytes_up" in r and r["client"] != "server"}
    assert ups[0] < ups[1] < ups[2]  # rank-r_i uploads, padding not sent
    assert int(state.server["lora_rank"]) == fed.cfg.lora.r
    again = Simulator(fed, build_method("flora", {"ranks": ranks}), seed=0)
    state2 = again.initial_state()
    assert strip_times(again.run_round(state2)) == strip_times(rows)
    assert all(torch.equal(state.server[k], state2.server[k]) for k in state.server)
