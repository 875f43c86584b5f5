"""The serverless simulator (fl/gossip.py) and the decentralized methods, on the tiny federation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import assert_same_tensors, base_snapshot, make_config, strip_times
from fedlora import compare, prepare
from fedlora.config import ConfigError
from fedlora.fl.engine import Simulator
from fedlora.fl.gossip import GossipSimulator, consensus_distance
from fedlora.fl.methods import build_method
from fedlora.fl.methods.gossip_base import auto_interval, gossip_average, phase
from fedlora.fl.payload import encode
from fedlora.model.lora import init_adapter_state

DECENTRALIZED = ["dec_lora", "dec_ffa", "dec_rolora", "tad_lora"]
ER = ("topology.graph=erdos_renyi", "topology.p=0.5")


def _with(fed, *overrides):
    """The session federation under a config with `overrides` (same partition: 3 clients)."""
    return dataclasses.replace(fed, cfg=make_config(*overrides))


@pytest.fixture(scope="module")
def fed5(fed):
    """Five clients on the tiny model (reusing the session's model and table)."""
    cfg = make_config("partition.num_clients=5", *ER, "fl.rounds=4")
    return prepare(cfg, model=fed.model, tokenizer=fed.tokenizer, table=fed.table)


@pytest.fixture(scope="module")
def runs(fed):
    cache = {}

    def get(method: str, seed: int = 0, *overrides: str):
        key = (method, seed, overrides)
        if key not in cache:
            before = base_snapshot(fed.model)
            result = GossipSimulator(_with(fed, *ER, "fl.rounds=3", *overrides), method, seed=seed).run()
            cache[key] = (result, before, base_snapshot(fed.model))
        return cache[key]

    return get


def _states_equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- known answers ------------------------------------------------------------------------------


def test_phase_schedule_known_answer():
    assert [phase(t, 1) for t in range(1, 5)] == ["b", "a", "b", "a"]
    assert [phase(t, 3) for t in range(1, 8)] == ["b", "b", "b", "a", "a", "a", "b"]
    assert auto_interval(0.75, 1.0, 100) == 2 and auto_interval(0.96, 1.0, 100) == 5
    assert auto_interval(1.0, 1.0, 30) == 30 and auto_interval(0.9999, 1.0, 30) == 30


def test_gossip_average_known_answer_and_exact_on_copies():
    own = {"x.lora_A": torch.tensor([1.0, 2.0]), "x.lora_B": torch.tensor([3.0])}
    nb = {4: {"x.lora_A": torch.tensor([3.0, 6.0])}, 2: {"x.lora_A": torch.tensor([5.0, 10.0])}}
    out = gossip_average(own, nb, {"self": 0.5, 2: 0.25, 4: 0.25}, ["x.lora_A"])
    assert torch.equal(out["x.lora_A"], torch.tensor([2.5, 5.0]))
    a = torch.rand(4, 7)
    w = {"self": 1 / 3, 0: 1 / 6, 1: 1 / 6, 2: 1 / 3}
    same = gossip_average({"a": a}, {j: {"a": a.clone()} for j in range(3)}, w, ["a"])
    assert torch.equal(same["a"], a)  # a shared frozen factor stays bitwise shared


def test_consensus_distance_known_answer():
    states = [{"m.lora_A": torch.tensor([[1.0, 0.0]]), "m.lora_B": torch.tensor([[1.0], [0.0]])},
              {"m.lora_A": torch.tensor([[1.0, 0.0]]), "m.lora_B": torch.tensor([[-1.0], [0.0]])}]
    d = consensus_distance(states)
    assert d["consensus_a"] == 0 and d["consensus_b"] == pytest.approx(1.0)  # (1 + 1) / 2
    assert d["consensus_adapter"] == pytest.approx(1.0) and d["consensus_product"] == pytest.approx(1.0)
    assert consensus_distance([states[0], states[0]])["consensus_adapter"] == 0


# --- dispatch and configuration -----------------------------------------------------------------


def test_each_simulator_refuses_the_other_kind(fed):
    with pytest.raises(ValueError, match="decentralized"):
        Simulator(fed, "tad_lora")
    with pytest.raises(ValueError, match="needs a server"):
        GossipSimulator(fed, "fedit")


@pytest.mark.parametrize("override,key", [("fl.client_fraction=0.5", "fl.client_fraction"),
                                          ("robust.momentum=0.5", "robust.momentum")])
def test_unsupported_settings_name_the_key(fed, override, key):
    with pytest.raises(ConfigError, match=key):
        GossipSimulator(_with(fed, override), "dec_lora")


@pytest.mark.parametrize("method,options,match", [("tad_lora", {"interval": 0}, "interval"),
                                                  ("tad_lora", {"interval": "often"}, "interval"),
                                                  ("tad_lora", {"interval_constant": 0}, "interval_constant"),
                                                  ("dec_rolora", {"interval": "auto"}, "interval"),
                                                  ("dec_lora", {"interval": 2}, "no option")])
def test_bad_method_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        build_method(method, options)


# --- the contract, over every decentralized method ----------------------------------------------


@pytest.mark.parametrize("method", DECENTRALIZED)
def test_only_adapters_change_and_masks_hold(runs, fed, method):
    result, before, after = runs(method)
    assert_same_tensors(before, after)
    init = init_adapter_state(fed.model, 0)
    m = build_method(method)
    trained = set("".join(m.train_mask_at(t) for t in range(1, 4)))
    for client in result.state.clients:
        assert set(client) == set(init)
        for k in init:  # a factor moves if and only if some round trained it
            moved = not torch.equal(client[k], init[k])
            assert moved == (("a" if k.endswith("lora_A") else "b") in trained), (method, k)


@pytest.mark.parametrize("method", DECENTRALIZED)
def test_rows_have_per_client_and_global_scores(runs, fed, method):
    result, _, _ = runs(method)
    assert {r["round"] for r in result.rows} == {1, 2, 3}
    assert all(r["method"] == method for r in result.rows)
    final = [r for r in result.rows if r["round"] == 3 and isinstance(r["client"], int)]
    assert sorted(r["client"] for r in final) == [0, 1, 2]
    for r in final:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["global_accuracy"] <= 1 and r["split"] == "test"
    glob = next(r for r in result.rows if r["round"] == 3 and r["client"] == "global")
    assert glob["accuracy"] == pytest.approx(np.mean([r["global_accuracy"] for r in final]))
    assert glob["accuracy_std"] == pytest.approx(np.std([r["global_accuracy"] for r in final]))
    network = [r for r in result.rows if r["client"] == "server"]
    assert [r["round"] for r in network] == [1, 2, 3]
    for r in network:
        assert {"rho", "connected", "components", "consensus_adapter", "consensus_product", "edge_bytes"} <= set(r)
        assert r["sampled"] == [0, 1, 2] and r["bytes_down"] == 0


@pytest.mark.parametrize("method", DECENTRALIZED)
def test_same_seed_same_run_other_seed_other_run(runs, fed, method):
    first, _, _ = runs(method)
    again = GossipSimulator(_with(fed, *ER, "fl.rounds=3"), method, seed=0).run()
    assert strip_times(first.rows) == strip_times(again.rows)
    assert all(_states_equal(a, b) for a, b in zip(first.state.clients, again.state.clients, strict=True))
    other, _, _ = runs(method, 1)
    assert not all(_states_equal(a, b) for a, b in zip(first.state.clients, other.state.clients))


@pytest.mark.parametrize("method", DECENTRALIZED)
def test_bytes_per_edge_are_the_real_encodings(runs, fed, method):
    """Every directed edge of the round's graph carries one encoding of the sender's payload; its
    length is the reported one; per-client and per-round sums agree."""
    result, _, _ = runs(method)
    sim = GossipSimulator(_with(fed, *ER, "fl.rounds=3"), method, seed=0)
    init = init_adapter_state(fed.model, 0)  # sizes depend on names, shapes, dtypes and metadata only
    for r in range(1, 4):
        adj = sim.topology.adjacency(r)
        network = next(row for row in result.rows if row["client"] == "server" and row["round"] == r)
        edges = {(j, i): b for j, i, b in network["edge_bytes"]}
        assert set(edges) == {(j, i) for j, i in zip(*np.nonzero(adj))}
        for (j, i), size in edges.items():
            blob = encode(sim.method.send(init, r), {"num_examples": len(fed.clients[j].train)},
                          round_index=r, client_id=j)
            assert size == len(blob)
        assert network["bytes_up"] == sum(edges.values())
        for cid in range(3):
            row = next(x for x in result.rows if x["client"] == cid and x["round"] == r)
            assert row["bytes_up"] == sum(b for (j, _), b in edges.items() if j == cid)
            assert row["bytes_down"] == sum(b for (_, i), b in edges.items() if i == cid)
            assert row["degree"] == adj[cid].sum()


def test_ffa_sends_half_and_tad_sends_both(runs):
    def sent(method):
        result, _, _ = runs(method)
        return [r for r in result.rows if r["client"] == "server"][0]

    assert sent("dec_ffa")["sent"] == "b" and sent("tad_lora")["sent"] == "ab"
    assert sent("dec_ffa")["bytes_up"] < sent("tad_lora")["bytes_up"] == sent("dec_lora")["bytes_up"]


# --- the properties the issue asks for ----------------------------------------------------------


def test_only_neighbours_payloads_reach_a_client(fed5):
    """Instrument `mix`: in every round, client i is handed exactly the payloads of N_t(i), with
    weights of exactly those neighbours and itself; a stranger's payload is refused."""
    seen = []

    class Spy(type(build_method("tad_lora"))):
        def mix(self, own, neighbours, weights, round_index):
            seen.append((round_index, sorted(neighbours), sorted(k for k in weights if k != "self")))
            return super().mix(own, neighbours, weights, round_index)

    sim = GossipSimulator(fed5, Spy(interval=1))
    sim.run()
    assert len(seen) == 4 * 5
    for k, (r, got, weighted) in enumerate(seen):
        cid = k % 5  # clients mix in id order
        expected = np.flatnonzero(sim.topology.adjacency(r)[cid]).tolist()
        assert got == weighted == expected, (r, cid)
    assert any(not got for _, got, _ in seen) and any(len(got) >= 2 for _, got, _ in seen)
    adj = sim.topology.adjacency(1)
    stranger = next(j for j in range(1, 5) if not adj[0, j])
    state = sim.initial_state()
    with pytest.raises(RuntimeError, match="non-neighbours"):
        sim.gossip.mix_one(state.clients[0], {stranger: state.clients[stranger]}, np.eye(5)[0], adj[0], 0, 1)


def test_tad_with_phase_b_only_equals_decentralized_ffa(fed5):
    """interval >= rounds: only B is trained, A is shared and frozen, and mixing the identical A's
    gives A back bit for bit, so TAD-LoRA is decentralized FFA-LoRA (plus A's bytes)."""
    tad = GossipSimulator(fed5, build_method("tad_lora", {"interval": 10})).run()
    ffa = GossipSimulator(fed5, "dec_ffa").run()
    assert all(_states_equal(a, b) for a, b in zip(tad.state.clients, ffa.state.clients, strict=True))
    drop = ("bytes_up", "bytes_down", "edge_bytes", "sent", "interval", "method")

    def clean(rows):
        return [{k: v for k, v in r.items() if k not in drop} for r in strip_times(rows)]

    assert clean(tad.rows) == clean(ffa.rows)


def test_phase_schedule_is_common_to_all_clients(fed5):
    result = GossipSimulator(fed5, build_method("tad_lora", {"interval": 2})).run()
    for r in range(1, 5):
        phases = {row["phase"] for row in result.rows if row["round"] == r and isinstance(row["client"], int)}
        assert phases == {phase(r, 2)}
    # B trained in rounds 1-2 only, A in 3-4: A moved only after round 2 on every client.
    consensus_a = [row["consensus_a"] for row in result.rows if row["client"] == "server"]
    assert consensus_a[:2] == [0, 0] and all(c > 0 for c in consensus_a[2:])


def test_rolora_mixes_only_the_active_factor_tad_mixes_both(fed):
    """One A round on a graph: dec_rolora sends A only, and its frozen B is never mixed."""
    cfg = (*ER, "fl.rounds=2")
    rolora = GossipSimulator(_with(fed, *cfg), "dec_rolora")
    state = rolora.initial_state()
    rolora.run_round(state)
    assert all(k.endswith("lora_A") for k in rolora.method.send(state.clients[0], 2))
    before_b = [{k: v for k, v in c.items() if k.endswith("lora_B")} for c in state.clients]
    rows = rolora.run_round(state)
    after_b = [{k: v for k, v in c.items() if k.endswith("lora_B")} for c in state.clients]
    assert all(_states_equal(a, b) for a, b in zip(before_b, after_b))  # not trained, not mixed
    assert next(r for r in rows if r["client"] == "server")["sent"] == "a"


def test_complete_graph_reaches_exact_consensus_every_round(fed):
    """MH on a complete graph is W = J: after each round's mix every client holds the average."""
    for method in ("dec_lora", "tad_lora"):
        result = GossipSimulator(_with(fed, "topology.graph=complete", "fl.rounds=2"), method).run()
        for row in (r for r in result.rows if r["client"] == "server"):
            assert row["consensus_adapter"] < 1e-12 and row["consensus_product"] < 1e-12 and row["rho"] < 1e-12


def test_disconnected_draws_are_reported(fed5):
    cfg = dataclasses.replace(fed5.cfg, topology=dataclasses.replace(fed5.cfg.topology, p=0.05))
    result = GossipSimulator(dataclasses.replace(fed5, cfg=cfg), "dec_lora").run()
    network = [r for r in result.rows if r["client"] == "server"]
    assert all(not r["connected"] and r["components"] > 1 for r in network)
    assert sum(r["isolated"] for r in network) > 0


def test_tad_auto_interval_from_rho(fed):
    sim = GossipSimulator(_with(fed, "topology.graph=pairwise", "topology.q=0.5", "fl.rounds=20"),
                          build_method("tad_lora", {"interval": "auto", "interval_constant": 2.0}))
    assert sim.method.options["interval"] == auto_interval(sim.rho, 2.0, 20) >= 2
    assert 0 < sim.rho < 1


def test_optimizer_state_kept_per_factor(fed):
    """With reset_optimizer=False and train.optimizer_state=keep, each client keeps one AdamW state
    per factor, so the B moments never land on A after a phase switch."""
    sim = GossipSimulator(_with(fed, *ER, "fl.rounds=3", "train.optimizer_state=keep"),
                          build_method("tad_lora", {"interval": 1, "reset_optimizer": False}))
    result = sim.run()
    assert all(set(opt) == {"a", "b"} for opt in result.state.optimizer)
    reset = GossipSimulator(_with(fed, *ER, "fl.rounds=3", "train.optimizer_state=keep"),
                            build_method("tad_lora", {"interval": 1})).run()
    assert all(opt is None for opt in reset.state.optimizer)


# --- end to end through the experiment layer ----------------------------------------------------


def test_compare_runs_decentralized_methods(tmp_path):
    cfg = make_config(*ER, "fl.rounds=2", "eval.baseline=none", output_dir=tmp_path)
    out = compare(cfg, ["dec_lora", "tad_lora", "fedit"], seeds=[0, 1], quiet=True)
    table = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())}
    for m in ("dec_lora", "tad_lora"):
        assert table[m]["scored_with"] == "personal"
        assert table[m]["global"]["accuracy"]["count"] == 3 * 2  # every client's adapter, every seed
        assert table[m]["megabytes"] > 0
        summary = json.loads((out / f"{m}-seed0" / "summary.json").read_text())
        assert {"rho", "disconnected_rounds", "consensus_product", "clients_on_global_test"} <= set(summary)
        assert sorted(p.name for p in (out / f"{m}-seed0" / "adapters").iterdir()) == ["client_0", "client_1",
                                                                                     "client_2"]
    assert table["fedit"]["global"]["accuracy"]["count"] == 2
    assert "tad_lora" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("options,keep", [({"interval": 1, "reset_optimizer": False}, True), ({}, False)])
def test_resume_from_checkpoint_equals_uninterrupted(fed, tmp_path, options, keep):
    """A checkpoint after round 1 (per-factor AdamW states included) resumes to the same run."""
    from fedlora.fl.checkpoint import read_checkpoint, restore_state, round_dir
    from fedlora.fl.engine import RunState

    settings = (*ER, "fl.rounds=3", "fl.keep_checkpoints=3", f"train.optimizer_state={'keep' if keep else 'reset'}")
    full = GossipSimulator(_with(fed, *settings), build_method("tad_lora", options), checkpoint_dir=tmp_path).run()
    ck = read_checkpoint(round_dir(tmp_path, 1))
    assert ck.round == 1
    if keep:
        assert all(set(opt) == {"b"} for opt in ck.fields["optimizer"])
    resumed = GossipSimulator(_with(fed, *settings), build_method("tad_lora", options)).run(
        restore_state(RunState, ck.fields), ck.rows)
    assert strip_times(resumed.rows) == strip_times(full.rows)
    assert all(_states_equal(a, b) for a, b in zip(resumed.state.clients, full.state.clients, strict=True))


# --- faults -------------------------------------------------------------------------------------


def _one_round(fed5, *overrides):
    sim = GossipSimulator(_with(fed5, "partition.num_clients=5", *ER, "fl.rounds=1", "fl.eval_every=0",
                                *overrides), "dec_lora")
    state = sim.initial_state()
    before = [dict(c) for c in state.clients]
    rows = sim.run_round(state)
    return sim, before, state, [r for r in rows if r["client"] == "server"][0], rows


def test_gossip_dropout_takes_a_client_off_the_graph(fed5):
    """A dropped client neither trains, sends nor mixes: its adapter is untouched and no edge
    touches it; the others still train and mix."""
    sim, before, state, net, rows = _one_round(fed5, "fl.dropout=0.5")
    dropped = net["dropped"]
    assert dropped and len(dropped) < 5, "seed 0 should drop some but not all of 5 clients at p=0.5"
    for cid in dropped:
        assert _states_equal(state.clients[cid], before[cid])
        assert all(cid not in (j, i) for j, i, _ in net["edge_bytes"])
    assert {r["client"] for r in rows if r.get("local_steps")} == set(range(5)) - set(dropped)


def test_gossip_straggler_payload_misses_the_round(fed5):
    """With a deadline, a late client trains but none of its payloads is delivered."""
    sim, before, state, net, rows = _one_round(fed5, "fl.deadline=0.5")
    late = net["late"]
    assert late, "seed 0 should make someone late at deadline 0.5 x mean latency"
    assert all(j not in late for j, _, _ in net["edge_bytes"])
    assert all(r.get("local_steps") for r in rows if r["client"] in late)


def test_gossip_failing_client_is_reported_and_run_goes_on(fed5, monkeypatch):
    sim = GossipSimulator(_with(fed5, "partition.num_clients=5", *ER, "fl.rounds=1", "fl.eval_every=0"),
                          "dec_lora")
    original = sim.local_round

    def flaky(state, cid, *args, **kwargs):
        if cid == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(state, cid, *args, **kwargs)

    monkeypatch.setattr(sim, "local_round", flaky)
    state = sim.initial_state()
    before = dict(state.clients[2])
    rows = sim.run_round(state)
    net = [r for r in rows if r["client"] == "server"][0]
    assert net["failed"] == [2] and _states_equal(state.clients[2], before)
    assert [r["error"] for r in rows if r["client"] == 2] == ["RuntimeError: out of memory (simulated)"]
    assert all(2 not in (j, i) for j, i, _ in net["edge_bytes"])


def test_gossip_stale_policy_is_refused(fed5):
    with pytest.raises(ConfigError, match="straggler_policy"):
        GossipSimulator(_with(fed5, *ER, "fl.deadline=1", "fl.straggler_policy=stale"), "dec_lora")
