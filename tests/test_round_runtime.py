"""The round runtime (issue 15): named random streams, the payload schema, the combine chain, and
the six bugs found where two features met, each pinned by a test that failed before the redesign."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import make_config
from fedlora.config import ConfigError, DPConfig, RobustConfig
from fedlora.fl import client_runtime
from fedlora.fl.attacks import choose_byzantine
from fedlora.fl.combine import mean_methods
from fedlora.fl.engine import Simulator
from fedlora.fl.payload import encode
from fedlora.fl.streams import STREAMS, Streams
from fedlora.fl.timer import Timer
from fedlora.train.local import LocalResult


def _fed(fed, rounds: int = 2, fl: dict | None = None, robust: RobustConfig | None = None,
         dp: DPConfig | None = None):
    cfg = dataclasses.replace(fed.cfg, fl=dataclasses.replace(fed.cfg.fl, rounds=rounds, **(fl or {})),
                              robust=robust or RobustConfig(), dp=dp or DPConfig())
    return dataclasses.replace(fed, cfg=cfg)


def _servers(result) -> list[dict]:
    return [r for r in result.rows if r["client"] == "server"]


def _dist(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).double().square().sum() for k in a) ** 0.5)


# ---------------------------------------------------------------- streams


def test_streams_keep_the_keys_runs_were_recorded_with():
    """Legacy streams draw exactly what the hand-numbered salts drew, so recorded runs reproduce."""
    s, r, c = 5, 3, 2
    assert Streams(s).integer("fresh_adapter", r, c) == int(np.random.default_rng([s, r, c, 1]).integers(2**62))
    assert Streams(s).numpy("dropout", r, c).random() == np.random.default_rng([s, r, c, 2]).random()
    assert Streams(s).numpy("client_sampling", r).random() == np.random.default_rng([s, r, 10**6]).random()
    legacy_noise = torch.Generator().manual_seed(int(np.random.default_rng([s, r, 10**6 + 3]).integers(2**62)))
    assert torch.equal(torch.randn(4, generator=Streams(s).torch("dp_noise", r)), torch.randn(4, generator=legacy_noise))


def test_every_stream_has_its_own_key_and_unknown_names_fail():
    assert len(set(STREAMS.values())) == len(STREAMS)
    with pytest.raises(KeyError, match="declare it in fedlora.fl.streams"):
        Streams(0).numpy("my_feature", 1, 0)
    with pytest.raises(ValueError, match="server stream"):
        Streams(0).numpy("dp_noise", 1, 0)


# ---------------------------------------------------------------- bug 1: f and honest absence


def test_honest_dropout_never_lowers_f_and_too_few_updates_skip_the_round(fed):
    """Trimmed mean with f = 1 needs n > 2: a round that honest dropouts leave with 2 updates is
    skipped with the reason, never averaged (before: f was lowered to 0, i.e. the mean)."""
    attack = RobustConfig(byzantine=1, attack="sign_flip", attack_args={"scale": 50.0},
                          aggregator=["trimmed_mean"], f=1)
    result = Simulator(_fed(fed, rounds=6, fl={"dropout": 0.25}, robust=attack), "fedit").run()
    servers = _servers(result)
    assert any(s["dropped"] for s in servers), "the seed should drop an honest client in some round"
    assert any(not s["skipped"] for s in servers), "and leave every client on line in another"
    for s in servers:
        assert s["robust_f"] == 1
        if s["replies"] < 3:
            assert s["skipped"] and "n > 2f" in s["skip_reason"] and "honest absence" in s["skip_reason"]
        else:
            assert not s["skipped"]


def test_rejected_senders_are_the_only_thing_that_lowers_f(fed):
    """A malformed upload proves its sender faulty: median then runs on the 2 others with f = 0."""
    robust = RobustConfig(byzantine=1, attack="malformed:nan", aggregator=["median"], f=1)
    result = Simulator(_fed(fed, rounds=1, robust=robust), "fedit").run()
    (server,) = _servers(result)
    assert server["num_rejected"] == 1 and server["robust_f"] == 0 and not server["skipped"]


# ---------------------------------------------------------------- bug 4: momentum for everyone who trains


def _constant_training(monkeypatch, step: float = 0.1):
    """local_train that moves every trainable parameter by `step` (exact, fast)."""
    def fake(model, params, data, cfg, steps, rng, pad_id, sample_weights=None, optimizer_state=None,
             extra_loss=None, progress=None):
        with torch.no_grad():
            for p in params:
                p.add_(step)
        return LocalResult(loss=0.0, steps=steps, examples=0, optimizer_state=None)

    monkeypatch.setattr(client_runtime, "local_train", fake)


def test_label_flippers_follow_worker_momentum_like_honest_clients(fed, monkeypatch):
    """Every client that trains sends start + (1 - beta) g in round 1, label flippers included
    (before: they sent start + g, about 10x larger with beta = 0.9)."""
    _constant_training(monkeypatch, 0.1)
    beta = 0.9
    sim = Simulator(_fed(fed, rounds=1, robust=RobustConfig(byzantine=1, label_flip=True, momentum=beta)), "fedit")
    state = sim.initial_state()
    sent = {}
    for cid in range(3):
        update, _ = sim.client_round(state, cid, 1, Timer())
        ref = sim.reference(state.server, cid)
        sent[cid] = {k: update.tensors[k] - ref[k] for k in ref}
    trained_mask = {k for k, v in sent[0].items() if v.abs().max() > 0}
    assert trained_mask
    for cid, delta in sent.items():
        for k in trained_mask:
            torch.testing.assert_close(delta[k], torch.full_like(delta[k], (1 - beta) * 0.1), atol=1e-6, rtol=1e-4)
    assert sim.byzantine == choose_byzantine(3, 1, fed.cfg.seed)


# ---------------------------------------------------------------- bug 5: example counts


@pytest.mark.parametrize("count", [0, -3, 10**400, 10**15, 2.5, True])
def test_example_counts_outside_the_declared_size_are_rejected(fed, count):
    sim = Simulator(_fed(fed, rounds=1), "fedit")
    state = sim.initial_state()
    payload = sim.reference(state.server, 0)
    blob = encode(payload, {"num_examples": count}, round_index=1, client_id=0)
    update, row = sim.receive(0, blob, len(sim.train_sets[0]), {"client": 0}, Timer(), round_index=1)
    assert update is None and row["rejected"] and row["reject_reason"] in {"examples", "metadata"}


def test_a_client_claiming_a_huge_count_cannot_own_the_global_adapter(fed, monkeypatch):
    """Before: 10**15 made one client's tensors the FedIT global adapter exactly. Now it is rejected
    and the round goes on with the others."""
    original = Simulator.receive

    def liar(self, cid, payload, num_examples, row, timer, round_index=None):
        if cid == 1 and isinstance(payload, dict):
            payload = encode(payload, {"num_examples": 10**15}, round_index=round_index, client_id=cid)
        return original(self, cid, payload, num_examples, row, timer, round_index=round_index)

    monkeypatch.setattr(Simulator, "receive", liar)
    result = Simulator(_fed(fed, rounds=1), "fedit").run()
    (server,) = _servers(result)
    assert server["rejected"] == [1] and server["reject_reasons"] == {"examples": 1} and not server["skipped"]


def test_robust_chains_ignore_example_counts(fed):
    """The chain 'mean' is the uniform mean of the updates whatever counts clients report."""
    sim = Simulator(_fed(fed, rounds=1, robust=RobustConfig(aggregator=["mean"])), "fedit")
    state = sim.initial_state()
    ref = sim.reference(state.server, 0)
    from fedlora.fl.methods import ClientUpdate

    ups = [ClientUpdate(i, {k: v + float(i + 1) for k, v in ref.items()}, n) for i, n in enumerate([1, 50, 1000])]
    got = sim.aggregate(state, ups, 1)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k] + 2.0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bug 6: the sampler the accountant assumes


def test_dp_defaults_to_poisson_sampling_and_reports_it(fed):
    dp = DPConfig(enabled=True, noise_multiplier=1.0, clip=1.0)
    sim = Simulator(_fed(fed, rounds=3, fl={"client_fraction": 0.5}, dp=dp), "fedit")
    assert sim.server.sampling == "poisson"
    sizes = {len(sim.sample_clients(r)) for r in range(1, 40)}
    assert len(sizes) > 1  # Poisson: the round's size varies
    result = sim.run()
    report = sim.dp_summary(result.state)["dp"]
    assert report["sampling"] == "poisson" and report["rounds_accounted"] == 3
    fixed = Simulator(_fed(fed, rounds=3, fl={"client_fraction": 0.5, "sampling": "fixed"}, dp=dp), "fedit")
    assert {len(fixed.sample_clients(r)) for r in range(1, 10)} == {2}
    fixed_report = fixed.dp_summary(fixed.run().state)["dp"]
    assert fixed_report["sampling"] == "fixed"
    # Fixed-size sampling (2 of 3, accounted without replacement) is dearer than Poisson at q = 0.5.
    assert fixed_report["sample_rate"] == pytest.approx(2 / 3)
    assert fixed_report["epsilon"] > report["epsilon"]


def test_poisson_dp_rounds_release_noise_even_when_nobody_arrives(fed, monkeypatch):
    dp = DPConfig(enabled=True, noise_multiplier=1.0, clip=0.5)
    sim = Simulator(_fed(fed, rounds=1, fl={"client_fraction": 0.5}, dp=dp), "fedit")
    monkeypatch.setattr(sim, "sample_clients", lambda r: [])
    state = sim.initial_state()
    before = {k: v.clone() for k, v in state.server.items()}
    rows = sim.run_round(state)
    server = next(r for r in rows if r["client"] == "server")
    assert not server["skipped"] and server["replies"] == 0 and math.isfinite(server["epsilon"])
    assert _dist(state.server, before) > 0  # the noise was released


# ---------------------------------------------------------------- composition refused before round 1


def test_eligibility_is_derived_from_what_methods_declare():
    names = mean_methods()
    assert {"fedit", "fedprox", "ffa", "fedsa", "fedadam"} <= set(names)
    assert not {"flora", "fedtree", "local", "centralized", "dec_lora", "tad_lora"} & set(names)


def test_a_stale_update_joins_only_the_next_round(fed, monkeypatch):
    """A late update is buffered for the next round only: when that round is skipped, it expires
    instead of piling up beside newer ones (before: a client late around a skipped round sent two
    updates into one round)."""
    from fedlora.fl.faults import RoundFaults

    sim = Simulator(_fed(fed, rounds=3, fl={"deadline": 1.0, "straggler_policy": "stale", "min_replies": 3}), "fedit")
    late = {1: [0], 2: [0, 1], 3: [0]}

    def servers():
        monkeypatch.setattr(sim, "_faults", lambda sampled, r: RoundFaults([], late[r]))
        state = sim.initial_state()
        return [next(r for r in sim.run_round(state) if r["client"] == "server") for _ in range(3)], state

    rows, state = servers()
    # Round 1: 2 replies, skipped. Round 2: 1 reply + client 0's round-1 update = 2, skipped.
    assert rows[0]["skipped"] and rows[1]["skipped"] and rows[0]["stale_applied"] == rows[1]["stale_applied"] == []
    # Round 3: clients 1, 2 on time + client 0's round-2 update; its round-1 update has expired.
    assert not rows[2]["skipped"] and rows[2]["replies"] == 3 and rows[2]["stale_applied"] == [0]
    assert [(e["client"], e["round"]) for e in state.stale] == [(0, 3)]
    late.update({1: [], 2: [0], 3: []})  # late once, on time next round: superseded
    rows, state = servers()
    assert rows[1]["skipped"] and rows[2]["stale_applied"] == [] and rows[2]["replies"] == 3 and state.stale is None


def test_an_accountant_that_cannot_account_the_sampler_fails_before_round_1(fed):
    dp = DPConfig(enabled=True, accountant="prv")
    with pytest.raises(ConfigError, match="prv"):
        Simulator(_fed(fed, fl={"client_fraction": 0.5, "sampling": "fixed"}, dp=dp), "fedit")


def test_a_stream_collision_is_caught_on_the_seeded_state(monkeypatch):
    """numpy pads seed sequences with zeros: key (0,) would draw what the key-less 'train' draws."""
    from fedlora.fl import streams

    monkeypatch.setitem(streams.STREAMS, "my_feature", ("client", (0,)))
    with pytest.raises(RuntimeError, match="'train' and 'my_feature' draw the same numbers"):
        streams._check_distinct()


def test_unknown_sampling_is_a_config_error():
    with pytest.raises(ConfigError, match="fl.sampling"):
        make_config("fl.sampling=bernoulli")


# ---------------------------------------------------------------- bugs 2 and 3: Concordia meets attacks and DP


@pytest.fixture
def fake_sampler(monkeypatch):
    from test_concordia import _jittered_rows
    from fedlora.synth.generator import TableGenerator

    monkeypatch.setattr(TableGenerator, "sample", _jittered_rows)


def _concordia_fed(fed, *overrides):
    from test_concordia import FAST

    return dataclasses.replace(fed, cfg=make_config(*FAST, *overrides))


def test_concordia_runs_with_an_update_attack_and_bucketing(fed, fake_sampler):
    """Before: ConcordiaSimulator._generator(state, cid) shadowed the engine's random-stream helper
    that attacks, bucketing and DP noise call: AttributeError. Now the attacker sends from the
    honest task updates and no scorer, and the chain runs on the task LoRA."""
    from fedlora.fl.concordia import concordia_simulator

    sim = concordia_simulator(_concordia_fed(fed, "robust.byzantine=1", "robust.attack=sign_flip",
                                             "robust.aggregator=[bucketing, mean]", "robust.f=1"), "fedit")
    result = sim.run()
    attacker = str(sim.byzantine[0])
    assert set(result.state.synthetic["ensemble"]) == {str(c) for c in range(3)} - {attacker}
    assert all(s["robust_f"] == 1 and not s["skipped"] for s in _servers(result))


def test_dp_refuses_a_side_channel_it_does_not_cover(fed, fake_sampler):
    """Before: Concordia's scorers were uploaded and redistributed un-clipped and un-noised while
    the run reported an epsilon. Now the pair is refused before round 1, naming both; a variant
    that sends no scorer runs with DP."""
    from fedlora.fl.concordia import concordia_simulator

    with pytest.raises(ConfigError, match=r"dp.enabled and concordia.*\['scorer'\]"):
        concordia_simulator(_concordia_fed(fed, "dp.enabled=true"), "fedit")
    sim = concordia_simulator(_concordia_fed(fed, "dp.enabled=true", "concordia.variant=decoupled"), "fedit")
    result = sim.run()
    assert all(math.isfinite(s["epsilon"]) for s in _servers(result))
    assert not result.state.synthetic["ensemble"]


# ---------------------------------------------------------------- a method with a side channel


def _sketch_method():
    from fedlora.fl.methods import weighted_mean
    from fedlora.fl.methods.fedit import FedIT

    class Sketch(FedIT):
        """FedIT plus one extra tensor per client (its update's norm): a method's own side channel."""

        name = "sketch"
        side_channels = ("sketch.",)

        def upload(self, trained, client):
            payload, client = super().upload(trained, client)
            return {**payload, "sketch.norm": torch.stack([v.norm() for v in payload.values()]).sum().reshape(1)}, client

        def aggregate(self, server, updates):
            keys = [k for k in updates[0].tensors if not k.startswith("sketch.")]
            return weighted_mean(updates, keys)

    return Sketch()


def test_a_method_declares_its_side_channel_in_its_own_file(fed):
    """The schema (derived from the method's upload) validates the channel; DP and robust rules,
    which cannot cover it, are refused before round 1 naming both."""
    sim = Simulator(_fed(fed, rounds=1), _sketch_method())
    result = sim.run()
    assert set(result.state.server) == set(sim.reference(result.state.server, 0))
    state = sim.initial_state()
    without = {k: v for k, v in sim.reference(state.server, 0).items()}  # no sketch tensor
    update, row = sim.receive(0, without, 5, {"client": 0}, Timer(), round_index=1)
    assert update is None and row["reject_reason"] == "keys"
    with pytest.raises(ConfigError, match=r"dp cannot apply to method 'sketch'.*sketch\."):
        Simulator(_fed(fed, dp=DPConfig(enabled=True)), _sketch_method())
    with pytest.raises(ConfigError, match=r"robust.aggregator cannot apply to method 'sketch'.*sketch\."):
        Simulator(_fed(fed, robust=RobustConfig(aggregator=["median"], f=1)), _sketch_method())
