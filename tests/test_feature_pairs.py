"""The feature-pair matrix (issue 15): every pair of features either runs, with both features'
effects asserted and the pair's invariants checked, or is refused before round 1 with a message
naming both. The verdicts are pinned (`REFUSED`), so a pair that starts or stops composing fails
here and must be looked at.

Runs use the session's tiny federation (3 clients, 3 rounds); Concordia's generator sampling is
replaced by jittered real rows as in tests/test_concordia.py (everything else runs for real).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from conftest import base_snapshot, make_config
from fedlora.fl.concordia import concordia_simulator
from fedlora.fl.engine import Simulator
from fedlora.fl.gossip import GossipSimulator
from fedlora.fl.methods import build_method, method_options
from fedlora.synth.generator import TableGenerator
from test_concordia import FAST, _jittered_rows


@dataclasses.dataclass(frozen=True)
class Feature:
    overrides: tuple[str, ...]
    slot: str
    """Features sharing a slot are alternatives (two methods, two attacks): no pair between them."""
    words: tuple[str, ...]
    """A refusal must name the feature by one of these."""


_ATTACK_WORDS = ("robust.attack", "robust.byzantine")
FEATURES = {
    "dropout": Feature(("fl.dropout=0.3",), "dropout", ("fl.dropout",)),
    "straggler_drop": Feature(("fl.deadline=0.3",), "straggler", ("fl.deadline", "straggler")),
    "straggler_stale": Feature(("fl.deadline=0.3", "fl.straggler_policy=stale"), "straggler", ("straggler_policy",)),
    "sign_flip": Feature(("robust.byzantine=1", "robust.attack=sign_flip", "robust.attack_args={scale: 10}"),
                         "byzantine", _ATTACK_WORDS),
    "alie": Feature(("robust.byzantine=1", "robust.attack=alie"), "byzantine", _ATTACK_WORDS),
    "mimic": Feature(("robust.byzantine=1", "robust.attack=mimic"), "byzantine", _ATTACK_WORDS),
    "optimal_ipm": Feature(("robust.byzantine=1", "robust.attack=optimal_ipm"), "byzantine", _ATTACK_WORDS),
    "label_flip": Feature(("robust.byzantine=1", "robust.label_flip=true"), "byzantine",
                          ("label_flip", "robust.byzantine")),
    "malformed": Feature(("robust.byzantine=1", "robust.attack=malformed:nan"), "byzantine", _ATTACK_WORDS),
    "momentum": Feature(("robust.momentum=0.9",), "momentum", ("robust.momentum",)),
    "dp": Feature(("dp.enabled=true", "dp.noise_multiplier=0.5", "dp.clip=1.0"), "dp", ("dp",)),
    "median": Feature(("robust.aggregator=[median]", "robust.f=1"), "chain", ("robust.aggregator",)),
    "nnm_trimmed_mean": Feature(("robust.aggregator=[nnm, trimmed_mean]", "robust.f=1"), "chain",
                                ("robust.aggregator",)),
    "bucketing_mean": Feature(("robust.aggregator=[bucketing, mean]", "robust.f=1"), "chain", ("robust.aggregator",)),
    "centered_clipping": Feature(("robust.aggregator=[centered_clipping]", "robust.f=1"), "chain",
                                 ("robust.aggregator",)),
    "concordia": Feature(FAST, "rule", ("concordia",)),
    "fedtree": Feature(("fl.method=fedtree",), "method", ("fedtree",)),
    "flora": Feature(("fl.method=flora",), "method", ("flora",)),
    "gossip": Feature(("fl.method=dec_lora",), "method", ("decentralized", "dec_lora")),
    "tad_lora": Feature(("fl.method=tad_lora",), "method", ("decentralized", "tad_lora")),
}
GOSSIP = {"gossip", "tad_lora"}
CHAINS = {"median", "nnm_trimmed_mean", "bucketing_mean", "centered_clipping"}
UPDATE_ATTACKS = {"sign_flip", "alie", "mimic", "optimal_ipm", "malformed"}
NEEDS_MEAN = UPDATE_ATTACKS | CHAINS | {"momentum", "dp"}

# The verdicts: pairs refused before round 1 (each for a reason its message states).
REFUSED = {
    *{frozenset({x, m}) for x in NEEDS_MEAN for m in ("fedtree", "flora")},  # no weighted mean to replace
    *{frozenset({x, g}) for x in NEEDS_MEAN | {"label_flip", "straggler_stale"} for g in GOSSIP},  # no server
    *{frozenset({"dp", c}) for c in CHAINS},            # noise is calibrated to the clipped sum
    frozenset({"dp", "straggler_stale"}),                 # a late update doubles the sensitivity
    frozenset({"dp", "concordia"}),                       # the scorers leave the client un-noised
    *{frozenset({"concordia", m}) for m in ("fedtree", "flora", *GOSSIP)},  # the generator's slot
}
PAIRS = [p for p in itertools.combinations(FEATURES, 2) if FEATURES[p[0]].slot != FEATURES[p[1]].slot]


def _simulator(fed, names):
    overrides = [o for name in names for o in FEATURES[name].overrides]
    cfg = make_config(*overrides, "fl.rounds=3", "fl.eval_every=0")
    pair_fed = dataclasses.replace(fed, cfg=cfg)
    method = build_method(cfg.fl.method, method_options(cfg, cfg.fl.method))
    if cfg.concordia.enabled:
        return concordia_simulator(pair_fed, method)
    return (GossipSimulator if method.decentralized else Simulator)(pair_fed, method)


def _servers(rows):
    return [r for r in rows if r["client"] == "server"]


def _check(name: str, sim, result, base_before) -> None:
    """The feature left its mark on the run."""
    rows, servers, state = result.rows, _servers(result.rows), result.state
    byz = [r for r in rows if r.get("byzantine") and isinstance(r["client"], int)]
    if name == "dropout":
        assert any(s["dropped"] for s in servers)
    elif name.startswith("straggler"):
        assert any(s["late"] for s in servers)
        if name == "straggler_stale":
            assert any(s["stale_applied"] for s in servers) or state.stale
    elif name in UPDATE_ATTACKS:
        assert byz and all("train_loss" not in r for r in byz)
        if name == "malformed":
            assert any(s["num_rejected"] for s in servers)
    elif name == "label_flip":
        assert byz and any("train_loss" in r for r in byz)
    elif name == "momentum":
        assert state.momentum is not None and any(m is not None for m in state.momentum)
    elif name == "dp":
        eps = [s["epsilon"] for s in servers]
        assert all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(eps)
    elif name in CHAINS:
        for s in servers:  # f is never lowered by honest absence; too few updates skip the round
            f = s["robust_f"]
            assert f == 1 - min(1, s["num_rejected"])
            needs = 1 if name == "bucketing_mean" else 2 * f + 1  # the rule's n > 2f (mean: n >= 1)
            assert s["skipped"] == (s["replies"] < needs), s
            assert s["skipped"] == ("skip_reason" in s)
    elif name == "concordia":
        assert any("syn_rows" in r for r in rows)
        attackers = {str(c) for c in sim.byzantine if sim.server.is_attacker(c)}
        assert not attackers & set(state.synthetic["ensemble"])  # attackers send no scorer
    elif name == "fedtree":  # the tree is built once every client has uploaded (warm-up waits for all)
        replied = set()
        for s in servers:
            gone = {*s["dropped"], *s["late"], *s["rejected"], *s["failed"]}
            replied |= {c for c in s["sampled"] if c not in gone and not sim.server.is_attacker(c)}
            replied |= set(s["stale_applied"])  # a late update that joined a round counts as its upload
        assert sim.method.has_tree(state.server) == (replied == {0, 1, 2})
    elif name == "flora":
        after = base_snapshot(sim.fed.model)
        assert all(torch.equal(after[k], base_before[k]) for k in base_before)  # W0 restored bitwise
    elif name in GOSSIP:
        assert all("consensus_adapter" in s for s in servers)


@pytest.fixture
def fake_sampler(monkeypatch):
    monkeypatch.setattr(TableGenerator, "sample", _jittered_rows)


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_feature_pair(fed, fake_sampler, pair):
    refused = frozenset(pair) in REFUSED
    try:
        sim = _simulator(fed, pair)
    except ValueError as exc:  # ConfigError included: refused before round 1
        assert refused, f"{pair} was refused but should run: {exc}"
        message = str(exc)
        for name in pair:
            assert any(w in message for w in FEATURES[name].words), f"{pair}: {name} not named in {message!r}"
        return
    assert not refused, f"{pair} should be refused before round 1"
    base_before = base_snapshot(fed.model)
    result = sim.run()
    servers = _servers(result.rows)
    assert [s["round"] for s in servers] == [1, 2, 3]
    tensors = result.state.server if not sim.serverless else {k: v for c in result.state.clients for k, v in c.items()}
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    for name in pair:
        _check(name, sim, result, base_before)


def test_every_pair_is_in_the_matrix():
    assert len(PAIRS) == len({frozenset(p) for p in PAIRS}) > 100
    assert all(len(p) == 2 and p <= set(FEATURES) for p in REFUSED)
