"""Every registered method obeys one contract; plus known answers for the built-in methods.

The contract (PEFT-style matrix over `available_methods()`): two rounds on the tiny federation
change only adapter tensors; every client gets final-round test metrics; the same seed gives the
same rows and states bit for bit, another seed does not; the bytes reported are the lengths of
the safetensors encodings of what the method sends.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fedlora
from conftest import assert_same_tensors, base_snapshot, strip_times
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import ClientUpdate, Method, build_method, method_class, register, weighted_mean
from fedlora.fl.methods.fedit import FedIT
from fedlora.fl.payload import encode
from fedlora.model.lora import init_adapter_state, zero_pad_rank

# Server-based methods; the decentralized ones (no server) have their contract in test_gossip.py.
METHODS = [m for m in fedlora.available_methods() if not method_class(m).decentralized]


@pytest.fixture(scope="module")
def runs(fed):
    """Memoized 2-round runs: (method, seed) -> (result, base weights before, base weights after)."""
    cache = {}

    def get(method: str, seed: int, key: str = ""):
        if (method, seed, key) not in cache:
            before = base_snapshot(fed.model)
            result = Simulator(fed, method, seed=seed).run()
            cache[(method, seed, key)] = (result, before, base_snapshot(fed.model))
        return cache[(method, seed, key)]

    return get


def _states_equal(a, b) -> bool:
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) for k in a)


def _all_states(result):
    s = result.state
    return [s.server, *s.clients]


# --- the contract ------------------------------------------------------------------------------


def test_builtin_methods_registered():
    assert {"fedit", "local", "centralized"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_tensors_change(runs, fed, method):
    """Base weights bitwise equal before/after; every tensor of the kept adapter(s) trained."""
    result, before, after = runs(method, 0)
    assert_same_tensors(before, after)
    init = init_adapter_state(fed.model, 0)
    m, s = method_class(method)(), result.state
    # What the method scores, not its raw state (which may hold B only, or optimizer moments).
    kept = [m.personal_adapter(s.server, c) for c in s.clients] if m.personalized else [m.global_adapter(s.server)]
    kept = [a for a in kept if a]
    assert kept, "the method keeps no adapter"
    trained = [k for k in init if ("a" if k.endswith("lora_A") else "b") in m.train_mask]
    delta = m.base_delta(s.server)
    if delta is not None:
        # Merging methods (flora) score W0 + delta with a zero adapter: the delta must have moved.
        assert delta and all(d.abs().max() > 0 for d in delta.values()), f"{method}: base delta never moved"
    for full in kept:
        # Mixing methods (fedtree) also carry a frozen external branch and lambdas; check the factors.
        adapter = {k: v for k, v in full.items() if k.endswith(("lora_A", "lora_B"))}
        assert set(adapter) == set(init)
        assert all(adapter[k].shape == init[k].shape for k in init)
        if delta is not None:
            continue
        stuck = [k for k in trained if torch.equal(adapter[k], init[k])]
        if m.train_mask == "abc":  # CuMA: lora_B is expert 0 of N; a router may route no token to it in
            # two short rounds, so a module's B counts as trained when any of its experts' B moved.
            stuck = [k for k in stuck if not (k.endswith("lora_B") and full[k[:-6] + "cuma_B"].abs().sum() > 0)]
        assert not stuck, f"{method}: adapter tensors never trained: {stuck}"
        moved = [k for k in init if k not in trained and not torch.equal(adapter[k], init[k])]
        assert not moved, f"{method}: frozen adapter tensors changed: {moved}"


@pytest.mark.parametrize("method", METHODS)
def test_final_round_has_client_test_metrics(runs, fed, method):
    result, _, _ = runs(method, 0)
    rounds = fed.cfg.fl.rounds
    assert {r["round"] for r in result.rows} == set(range(1, rounds + 1))
    assert all(r["method"] == method for r in result.rows)
    for cid, client in enumerate(fed.clients):
        final = result.final(cid)
        assert final is not None and final["round"] == rounds and final["split"] == "test"
        assert final["n"] == len(client.test)
        assert 0.0 <= final["accuracy"] <= 1.0 and 0.0 <= final["macro_f1"] <= 1.0
    servers = [r for r in result.rows if r["client"] == "server"]
    assert [r["round"] for r in servers] == list(range(1, rounds + 1))
    has_global = method_class(method)().global_adapter({}) is not None and not method_class(method).personalized
    assert (result.final("global") is not None) == has_global


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_run(runs, fed, method):
    first, _, _ = runs(method, 0)
    second = Simulator(fed, method, seed=0).run()
    assert strip_times(first.rows) == strip_times(second.rows)
    for a, b in zip(_all_states(first), _all_states(second), strict=True):
        assert _states_equal(a, b)
    assert first.state.round == second.state.round == fed.cfg.fl.rounds


@pytest.mark.parametrize("method", METHODS)
def test_other_seed_other_run(runs, method):
    a, _, _ = runs(method, 0)
    b, _, _ = runs(method, 1)
    differs = [not _states_equal(x, y) for x, y in zip(_all_states(a), _all_states(b)) if x or y]
    assert differs and all(differs)


@pytest.mark.parametrize("method", METHODS)
def test_bytes_match_encoded_payloads(runs, fed, method):
    """bytes_down = len(encode(download)), bytes_up = len(encode(upload, meta)); 0 when nothing is sent."""
    result, _, _ = runs(method, 0)
    sim = Simulator(fed, method, seed=0)
    m = sim.method
    # Sizes depend on names, shapes, dtypes and metadata; the state is replayed round by round
    # because some methods send what the last round built (flora: the stack grows with its clients).
    state = sim.initial_state()
    for rnd in range(1, fed.cfg.fl.rounds + 1):
        server_row = next(r for r in result.rows if r["client"] == "server" and r["round"] == rnd)
        up = down = 0
        for cid in server_row["sampled"]:
            sent = m.download(state.server, cid)
            down += len(encode(sent)) if sent else 0
            received = (init_adapter_state(fed.model, 0) if m.fresh_each_round
                        else m.start_local(sent, state.clients[cid]))
            if m.client_rank(cid) is not None:
                received = zero_pad_rank(received, m.client_rank(cid))
            payload, _ = m.upload({k: v.clone() for k, v in received.items()}, state.clients[cid])
            meta = {"num_examples": len(sim.train_sets[cid]), "client_id": cid, "round": rnd}
            up += len(encode(payload, meta)) if payload else 0
        assert (server_row["bytes_up"], server_row["bytes_down"]) == (up, down), f"round {rnd}"
        if not m.pooled:
            for cid in server_row["sampled"]:
                row = next(r for r in result.rows if r["client"] == cid and r["round"] == rnd)
                assert row["bytes_up"] * len(server_row["sampled"]) == up
        sim.run_round(state)


# --- method-specific known answers -------------------------------------------------------------


def test_fedit_aggregate_known_answer():
    server = {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}
    u1 = ClientUpdate(0, {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.ones(2, 2)}, 1)
    u2 = ClientUpdate(1, {"a": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.full((2, 2), 3.0)}, 3)
    out = build_method("fedit").aggregate(server, [u1, u2])
    # p = (1/4, 3/4): a = [[4, 5], [6, 7]], b = 1/4 + 9/4 = 2.5
    assert torch.equal(out["a"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["b"], torch.full((2, 2), 2.5))
    assert out["a"].dtype == torch.float32
    # a single update is returned as is; equal counts give the plain mean
    assert torch.equal(build_method("fedit").aggregate(server, [u2])["a"], u2.tensors["a"])
    even = build_method("fedit").aggregate(server, [u1, dataclasses.replace(u2, num_examples=1)])
    assert torch.equal(even["a"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_fedit_averages_factors_not_products():
    """FedIT averages A and B separately: B_bar A_bar != mean(B_i A_i) (the cross terms)."""
    a1, a2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    b1, b2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    out = build_method("fedit").aggregate({"A": a1, "B": b1}, [ClientUpdate(0, {"A": a1, "B": b1}, 1),
                                                               ClientUpdate(1, {"A": a2, "B": b2}, 1)])
    assert torch.equal(out["B"] @ out["A"], torch.full((2, 2), 0.25))
    assert torch.equal((b1 @ a1 + b2 @ a2) / 2, torch.eye(2) / 2)


def test_weighted_mean_rejects_bad_input():
    t = {"x": torch.ones(2)}
    with pytest.raises(ValueError, match="zero updates"):
        weighted_mean([])
    with pytest.raises(ValueError, match="positive example count"):
        weighted_mean([ClientUpdate(0, t, 3), ClientUpdate(1, t, 0)])
    with pytest.raises(ValueError, match="positive example count"):
        weighted_mean([ClientUpdate(0, t, -1)])


def test_weighted_mean_float64_accumulation():
    updates = [ClientUpdate(i, {"x": torch.tensor([1e8 if i == 0 else 1.0])}, 1) for i in range(3)]
    out = weighted_mean(updates)
    assert out["x"].item() == pytest.approx((1e8 + 2) / 3, rel=1e-7)


def test_local_only_sends_nothing_and_personalizes(runs, fed):
    result, _, _ = runs("local", 0)
    assert result.personalized
    assert all(r.get("bytes_up", 0) == 0 and r.get("bytes_down", 0) == 0 for r in result.rows)
    assert result.state.server == {}
    clients = result.state.clients
    assert len(clients) == fed.num_clients
    for i in range(len(clients)):
        for j in range(i + 1, len(clients)):
            assert not _states_equal(clients[i], clients[j]), (i, j)
    assert result.final("global") is None


def test_local_only_after_one_round_clients_differ(fed):
    sim = Simulator(fed, "local", seed=0)
    state = sim.initial_state()
    assert all(_states_equal(state.clients[0], c) for c in state.clients)  # same start
    sim.run_round(state)
    assert not _states_equal(state.clients[0], state.clients[1])
    assert not _states_equal(state.clients[1], state.clients[2])


def test_centralized_uses_one_pooled_client(runs, fed):
    sim = Simulator(fed, "centralized", seed=0)
    assert len(sim.train_sets) == 1
    assert len(sim.train_sets[0]) == sum(len(c.train) for c in fed.clients)
    assert len(sim.initial_state().clients) == 1
    result, _, _ = runs("centralized", 0)
    assert all(r["sampled"] == [0] for r in result.rows if r["client"] == "server")
    # scored like a global method on every client's own test split and on the global test
    assert all(result.final(cid) is not None for cid in range(fed.num_clients))
    assert result.final("global") is not None


def test_centralized_reports_its_training_row(fed):
    """The pooled client's training row (loss, steps, bytes) must survive an evaluated round."""
    sim = Simulator(fed, "centralized", seed=0)
    rows = sim.run_round(sim.initial_state())
    losses = [r for r in rows if "train_loss" in r]
    assert len(losses) == 1
    assert losses[0]["local_steps"] == fed.cfg.train.local_steps * fed.num_clients


def test_registry_unknown_method_lists_available():
    with pytest.raises(ValueError) as info:
        build_method("fedavgx")
    message = str(info.value)
    assert "fedavgx" in message and all(m in message for m in METHODS)


def test_unknown_method_option_is_named():
    with pytest.raises(ValueError, match="'bogus'"):
        build_method("fedit", {"bogus": 1})
    with pytest.raises(ValueError, match="valid: none"):
        build_method("local", {"bogus": 1})


def test_register_validates():
    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="name"):
        register(Nameless)

    class Clash(FedIT):
        name = "fedit"

    with pytest.raises(ValueError, match="registered twice"):
        register(Clash)
    assert method_class("fedit") is FedIT
    assert register(FedIT) is FedIT  # re-registering the same class is harmless


@pytest.mark.parametrize("method", METHODS)
def test_state_survives_save_and_load(runs, fed, method):
    """Round 1, states through safetensors bytes, round 2: the same as two rounds in one go."""
    from fedlora.fl.engine import RunState
    from fedlora.fl.payload import decode

    full, _, _ = runs(method, 0)
    sim = Simulator(fed, method, seed=0)
    state = sim.initial_state()
    first = sim.run_round(state)

    def roundtrip(tensors):
        return decode(encode(tensors))[0]

    restored = RunState(server=roundtrip(state.server), clients=[roundtrip(c) for c in state.clients],
                        optimizer=state.optimizer, round=state.round)
    resumed = Simulator(fed, method, seed=0).run(restored)
    assert strip_times(first + resumed.rows) == strip_times(full.rows)
    assert _states_equal(resumed.state.server, full.state.server)
    assert all(_states_equal(a, b) for a, b in zip(resumed.state.clients, full.state.clients))
