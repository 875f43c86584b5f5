"""The simulator's `robust` section: robust chains, Byzantine attacks, rejection, worker momentum."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from conftest import make_config
from fedlora.config import ConfigError, RobustConfig
from fedlora.experiment import run
from fedlora.fl.attacks import choose_byzantine, flip_labels
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import ClientUpdate
from fedlora.fl.methods.base import weighted_mean
from fedlora.fl.preflight import preflight


def _fed(fed, rounds: int = 1, **robust):
    cfg = dataclasses.replace(fed.cfg, fl=dataclasses.replace(fed.cfg.fl, rounds=rounds),
                              robust=RobustConfig(**robust))
    return dataclasses.replace(fed, cfg=cfg)


def _server_after(fed, method="fedit", rounds=1, **robust):
    sim = Simulator(_fed(fed, rounds, **robust), method)
    result = sim.run()
    return sim, result


def _dist(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).double().square().sum() for k in a) ** 0.5)


def test_defaults_change_nothing(fed):
    sim, result = _server_after(fed)
    assert not sim.robust_on and sim.byzantine == [] and result.state.momentum is None
    assert all("byzantine" not in r and not r.get("rejected") for r in result.rows)
    servers = [r for r in result.rows if r["client"] == "server"]
    assert servers and all(s["num_rejected"] == 0 and s["reject_reasons"] == {} for s in servers)


def test_chain_validated_before_the_run(fed):
    with pytest.raises(ValueError, match=r"krum needs n > 2f \+ 2 \(n=3, f=1\)"):
        Simulator(_fed(fed, aggregator=["krum"], f=1), "fedit")


@pytest.mark.parametrize("method", ["flora", "fedtree", "local"])
def test_aggregator_needs_a_mean_method(fed, method):
    with pytest.raises(ValueError, match=method):
        Simulator(_fed(fed, aggregator=["median"], f=1), method)


def test_attack_and_momentum_need_a_mean_method(fed):
    with pytest.raises(ValueError, match="flora"):
        Simulator(_fed(fed, byzantine=1, attack="sign_flip"), "flora")
    with pytest.raises(ValueError, match="flora"):
        Simulator(_fed(fed, momentum=0.9), "flora")


@pytest.mark.parametrize("method", ["fedit", "fedavgm", "ffa", "fedsa"])
def test_mean_chain_matches_the_method_mean(fed, method):
    """With equal example counts, the chain 'mean' (uniform weights) is the method's own weighted mean;
    the server step after it (FedAvgM's momentum, FFA's frozen A, FedSA's shared A) is the method's."""
    sim = Simulator(_fed(fed, 1, aggregator=["mean"]), method)
    state = sim.initial_state()
    ref = sim.reference(state.server, 0)
    gen = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(i, {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}, 9)
           for i in range(3)]
    expected = sim.method.aggregate(state.server, ups)
    got = sim.aggregate(state, ups, 1)
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)


def test_sign_flip_moves_mean_far_more_than_robust_rules(fed):
    attack = {"byzantine": 1, "attack": "sign_flip", "attack_args": {"scale": 100.0}}
    # Honest-only reference: the Byzantine upload is malformed, hence rejected.
    _, honest = _server_after(fed, byzantine=1, attack="malformed:nan", aggregator=["mean"])
    _, mean = _server_after(fed, aggregator=["mean"], **attack)
    _, median = _server_after(fed, aggregator=["median"], f=1, **attack)
    _, trimmed = _server_after(fed, aggregator=["trimmed_mean"], f=1, **attack)
    _, plain = _server_after(fed, **attack)  # the method's own FedAvg: as exposed as mean
    ref = honest.state.server
    d_mean, d_plain = _dist(mean.state.server, ref), _dist(plain.state.server, ref)
    d_median, d_trim = _dist(median.state.server, ref), _dist(trimmed.state.server, ref)
    assert d_mean > 10 * d_median and d_mean > 10 * d_trim
    assert d_plain > 10 * d_median and d_plain > 10 * d_trim  # FedAvg's example-weighted mean: as exposed
    server_rows = [r for r in mean.rows if r["client"] == "server"]
    assert server_rows[0]["byzantine_sampled"] == choose_byzantine(3, 1, 0) and server_rows[0]["rejected"] == []


def test_malformed_upload_is_rejected_and_round_continues(fed, caplog):
    byz = choose_byzantine(3, 1, fed.cfg.seed)
    sim = Simulator(_fed(fed, rounds=1, byzantine=1, attack="malformed:nan"), "fedit")
    state = sim.initial_state()
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        rows = sim.run_round(state)
    assert any("rejected" in rec.getMessage() for rec in caplog.records)
    server = next(r for r in rows if r["client"] == "server")
    assert server["rejected"] == byz and server["num_rejected"] == 1
    assert server["reject_reasons"] == {"non_finite": 1}
    byz_row = next(r for r in rows if r["client"] == byz[0])
    assert byz_row["rejected"] is True and byz_row["byzantine"] is True and "train_loss" not in byz_row
    assert all(torch.isfinite(v).all() for v in state.server.values())
    # The server state is FedIT's mean of the honest clients alone.
    honest_sim = Simulator(_fed(fed, rounds=1), "fedit")
    hstate = honest_sim.initial_state()
    from fedlora.fl.timer import Timer

    ups = [honest_sim.client_round(hstate, c, 1, Timer())[0] for c in range(3) if c not in byz]
    expected = weighted_mean(ups, keys=list(hstate.server))
    for k in expected:
        torch.testing.assert_close(state.server[k], expected[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pickle", "wrong_shape", "truncated"])
def test_other_malformed_kinds_rejected(fed, kind):
    _, result = _server_after(fed, byzantine=1, attack=f"malformed:{kind}", aggregator=["median"], f=1)
    server = next(r for r in result.rows if r["client"] == "server")
    assert server["num_rejected"] == 1  # f shrinks with the rejected client: median runs on 2


def test_no_surviving_update_keeps_server(fed, monkeypatch):
    sim = Simulator(_fed(fed, rounds=1, byzantine=1, attack="malformed:nan"), "fedit")
    state = sim.initial_state()
    before = {k: v.clone() for k, v in state.server.items()}
    monkeypatch.setattr(sim, "sample_clients", lambda r: list(sim.byzantine))
    rows = sim.run_round(state)
    assert next(r for r in rows if r["client"] == "server")["rejected"] == sim.byzantine
    for k in before:
        assert torch.equal(before[k], state.server[k])


def test_label_flip_only_byzantine_clients(fed, monkeypatch):
    originals = [c.train.labels.copy() for c in fed.clients]
    sim = Simulator(_fed(fed, byzantine=1, label_flip=True), "fedit")
    num_classes = len(fed.clients[0].train.verbalizer_ids)
    seen = {}
    train = sim.client.train

    def spy(state, cid, r, received, data, *args, **kwargs):
        seen[cid] = data
        return train(state, cid, r, received, data, *args, **kwargs)

    monkeypatch.setattr(sim.client, "train", spy)
    # They train (label flipping is a data attack, flipped on whatever rows they train on) and are marked.
    rows = sim.run_round(sim.initial_state())
    for cid, data in seen.items():
        if cid in sim.byzantine:
            assert np.array_equal(data.labels, flip_labels(originals[cid], num_classes))
            assert data.prompt_ids == fed.clients[cid].train.prompt_ids
        else:
            assert data is fed.clients[cid].train
    assert set(seen) == {0, 1, 2}
    for cid, c in enumerate(fed.clients):  # the shared Federation is untouched
        assert np.array_equal(c.train.labels, originals[cid])
    assert sim.byzantine == choose_byzantine(3, 1, fed.cfg.seed)
    row = next(r for r in rows if r["client"] == sim.byzantine[0])
    assert row["byzantine"] is True and "train_loss" in row


def test_byzantine_ids_deterministic_and_recorded(fed, tmp_path):
    ids = [Simulator(_fed(fed, byzantine=1), "fedit").byzantine for _ in range(2)]
    assert ids[0] == ids[1] == choose_byzantine(3, 1, fed.cfg.seed)
    other = Simulator(_fed(fed, byzantine=2), "fedit", seed=5).byzantine
    assert other == choose_byzantine(3, 2, 5)
    cfg = make_config("fl.rounds=1", "eval.zero_shot=false", "eval.baseline=none", "robust.byzantine=1",
                      "robust.attack=sign_flip", "robust.attack_args={scale: 3.0}", "robust.aggregator=[median]",
                      "robust.f=1", output_dir=tmp_path)
    run_dir = run(cfg, quiet=True, fed=dataclasses.replace(fed, cfg=cfg))
    record = json.loads((run_dir / "byzantine.json").read_text())
    assert record["byzantine"] == ids[0] and record["attack"] == "sign_flip"
    assert record["attack_args"] == {"scale": 3.0} and record["aggregator"] == ["median"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marked = {r["client"] for r in rows if r.get("byzantine")}
    assert marked == set(ids[0])


def test_momentum_beta_zero_is_no_momentum(fed):
    _, plain = _server_after(fed, rounds=2)
    _, zero = _server_after(fed, rounds=2, momentum=0.0)
    for k in plain.state.server:
        torch.testing.assert_close(plain.state.server[k], zero.state.server[k], atol=1e-6, rtol=1e-5)
    _, smooth = _server_after(fed, rounds=2, momentum=0.9)
    assert smooth.state.momentum is not None and all(m is not None for m in smooth.state.momentum)
    assert _dist(smooth.state.server, plain.state.server) > 0


def test_momentum_first_round_sends_scaled_update(fed):
    sim = Simulator(_fed(fed, momentum=0.5), "fedit")
    state = sim.initial_state()
    start = {k: v.clone() for k, v in state.server.items()}
    from fedlora.fl.timer import Timer

    plain_sim = Simulator(_fed(fed), "fedit")
    pstate = plain_sim.initial_state()
    up, _ = sim.client_round(state, 0, 1, Timer())
    pu, _ = plain_sim.client_round(pstate, 0, 1, Timer())
    for k in up.tensors:  # m_1 = (1 - beta) g_1 with a zero start
        torch.testing.assert_close(up.tensors[k] - start[k], 0.5 * (pu.tensors[k] - start[k]), atol=1e-6, rtol=1e-5)
    assert isinstance(up, ClientUpdate)


def test_config_validation():
    with pytest.raises(ConfigError, match="robust.byzantine"):
        make_config("robust.byzantine=3")
    with pytest.raises(ConfigError, match="label_flip"):
        make_config("robust.byzantine=1", "robust.label_flip=true", "robust.attack=ipm")
    with pytest.raises(ConfigError, match="robust.attack"):  # attack names: fl/preflight.py
        preflight(make_config("robust.byzantine=1", "robust.attack=nope"))
    with pytest.raises(ConfigError, match="malformed"):
        preflight(make_config("robust.byzantine=1", "robust.attack=malformed:bogus"))
    with pytest.raises(ConfigError, match="byzantine >= 1"):
        make_config("robust.attack=ipm")
    with pytest.raises(ConfigError, match="momentum"):
        make_config("robust.momentum=1.0")
    cfg = make_config("robust.aggregator=[nnm, {trimmed_mean: {}}]", "robust.f=1", "robust.momentum=0")
    assert cfg.robust.aggregator == ["nnm", {"trimmed_mean": {}}] and cfg.robust.momentum == 0.0


@pytest.mark.parametrize("attack,args,aggregator", [
    ("optimal_ipm", {"grid": [0.1, 1.0], "refine": 2}, ["median"]),
    ("optimal_alie", {"grid": [0.5, 1.5], "refine": 1}, None),
    ("alie", {}, [{"centered_clipping": {"tau": 1.0}}]),
    ("gaussian", {"sigma": 0.1}, ["bucketing", "mean"]),
    ("mimic", {}, ["arc", "nnm", "trimmed_mean"]),
    ("inf", {}, ["median"]),
])
def test_attacks_and_chains_run(fed, attack, args, aggregator):
    f = 1 if aggregator and aggregator != ["bucketing", "mean"] else 0
    sim, result = _server_after(fed, rounds=2, byzantine=1, attack=attack, attack_args=args,
                                aggregator=aggregator, f=f)
    assert all(torch.isfinite(v).all() for v in result.state.server.values())
    servers = [r for r in result.rows if r["client"] == "server"]
    assert [s["num_rejected"] for s in servers] == ([1, 1] if attack == "inf" else [0, 0])
    if aggregator and "centered_clipping" in str(aggregator):
        assert result.state.aggregator  # the chain's state is carried across rounds
