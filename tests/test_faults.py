"""Client faults (fl/faults.py): dropouts, stragglers and stale updates, min_replies, failing
clients; and resume equivalence from a checkpoint across methods, robust state and faults."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from conftest import make_config, strip_times
from fedlora.config import ConfigError
from fedlora.fl.checkpoint import read_checkpoint, restore_state, round_dir, state_fields
from fedlora.fl.engine import RunState, Simulator
from fedlora.fl.faults import draw_faults, drops_out, latency, stale_entry, stale_update
from fedlora.fl.methods import ClientUpdate, available_methods, method_class
from fedlora.train.batches import EncodedExamples


def _sim(fed, method: str, *overrides: str, **kwargs) -> Simulator:
    """A simulator on the session federation with extra fl/train/robust overrides (data unchanged)."""
    return Simulator(dataclasses.replace(fed, cfg=make_config(*overrides)), method, **kwargs)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _server_row(rows, r=None):
    return next(row for row in rows if row["client"] == "server" and (r is None or row["round"] == r))


# --- the draws --------------------------------------------------------------------------------------

def test_dropout_draws_are_reproducible_independent_and_at_rate():
    fates = [drops_out(0, r, c, 0.3) for r in range(1, 2001) for c in range(3)]
    assert abs(np.mean(fates) - 0.3) < 0.02  # 6000 draws: std 0.006
    assert fates == [drops_out(0, r, c, 0.3) for r in range(1, 2001) for c in range(3)]
    # A client's fate does not depend on who else was sampled, nor on the deadline draws.
    for r in range(1, 50):
        alone = draw_faults(0, r, [2], 0.3, None, 1.0).dropped
        assert (2 in draw_faults(0, r, [0, 1, 2], 0.3, 1.0, 1.0).dropped) == (alone == [2])
    assert not any(drops_out(0, r, 0, 0.0) for r in range(100))
    assert fates != [drops_out(1, r, c, 0.3) for r in range(1, 2001) for c in range(3)]


def test_latency_is_exponential_and_deadline_sets_late_rate():
    draws = np.array([latency(0, r, c, 2.0) for r in range(1, 3001) for c in range(2)])
    assert abs(draws.mean() - 2.0) < 0.1 and (draws > 0).all()
    late = [len(draw_faults(0, r, [0, 1], 0.0, 1.0, 2.0).late) for r in range(1, 3001)]
    assert abs(sum(late) / 6000 - math.exp(-0.5)) < 0.02  # P(L > d) = exp(-d / mean)


def test_config_validation_names_the_key():
    for bad, key in [("fl.dropout=1.0", "fl.dropout"), ("fl.deadline=0", "fl.deadline"),
                     ("fl.staleness=0", "fl.staleness"), ("fl.min_replies=4", "fl.min_replies"),
                     ("fl.straggler_policy=wait", "fl.straggler_policy"), ("fl.keep_checkpoints=0", "fl.keep_checkpoints"),
                     ("fl.latency=-1", "fl.latency")]:
        with pytest.raises(ConfigError, match=key):
            make_config(bad)
    assert make_config("fl.min_replies=3").fl.min_replies == 3


# --- dropouts, min_replies, failures in the engine ---------------------------------------------------

def _round_with_dropout(dropout: float, at_least: int = 1) -> int:
    """The first round (seed 0, clients 0..2) in which at least `at_least` clients drop out."""
    return next(r for r in range(1, 200) if len(draw_faults(0, r, [0, 1, 2], dropout, None, 1.0).dropped) >= at_least)


def test_dropped_clients_do_not_train_and_are_recorded(fed):
    sim = _sim(fed, "local", "fl.dropout=0.5", "fl.rounds=4")
    state = sim.initial_state()
    for r in range(1, 5):
        before = [dict(c) for c in state.clients]
        rows = sim.run_round(state)
        dropped = draw_faults(0, r, [0, 1, 2], 0.5, None, 1.0).dropped
        server = _server_row(rows)
        assert server["dropped"] == dropped and server["replies"] == 3 - len(dropped)
        for cid in range(3):
            trained = any(row["client"] == cid and "train_loss" in row for row in rows)
            assert trained == (cid not in dropped)
            assert _equal(state.clients[cid], before[cid]) == (cid in dropped)
    again = _sim(fed, "local", "fl.dropout=0.5", "fl.rounds=4").run()
    assert strip_times(again.rows) == strip_times(_sim(fed, "local", "fl.dropout=0.5", "fl.rounds=4").run().rows)


@pytest.mark.parametrize("method", ["fedit", "fedadam"])
def test_min_replies_skip_leaves_server_bitwise_unchanged(fed, caplog, method):
    r = _round_with_dropout(0.5)
    sim = _sim(fed, method, "fl.dropout=0.5", "fl.min_replies=3", f"fl.rounds={r}")
    state = sim.initial_state()
    sim.run_round(state)  # some training first, so the server holds non-initial tensors (and Adam moments)
    state.round = r - 1  # the round counter only picks the draws
    server = {k: v.clone() for k, v in state.server.items()}
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        rows = sim.run_round(state)
    assert _equal(state.server, server)
    row = _server_row(rows)
    assert row["skipped"] is True and row["replies"] < 3 and row["dropped"]
    assert any(f"round {r} skipped" in m and "min_replies=3" in m for m in caplog.messages)
    assert any("accuracy" in row for row in rows)  # the run goes on and still evaluates


def test_failing_client_is_reported_and_the_run_continues(fed, caplog):
    sim = _sim(fed, "fedit", "train.optimizer_state=keep")
    good = sim.train_sets[1]
    sim.train_sets[1] = EncodedExamples([], np.array([], dtype=np.int64), good.verbalizer_ids)  # bad data
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        result = sim.run()
    for r in (1, 2):
        server = _server_row(result.rows, r)
        assert server["failed"] == [1] and server["replies"] == 2 and server["skipped"] is False
        failed = next(row for row in result.rows if row["round"] == r and row["client"] == 1)
        assert failed["error"].startswith("ValueError: a client has no training rows")
    assert result.state.optimizer[1] is None and result.state.optimizer[0] is not None  # untouched state
    assert any("client 1 failed" in m and "ValueError" in m for m in caplog.messages)
    # Below min_replies the rounds are skipped, never crashing: the server stays at its start.
    strict = _sim(fed, "fedit", "fl.min_replies=3")
    strict.train_sets[1] = sim.train_sets[1]
    start = strict.initial_state().server
    out = strict.run()
    assert _equal(out.state.server, start)
    assert all(_server_row(out.rows, r)["skipped"] for r in (1, 2))


# --- stragglers --------------------------------------------------------------------------------------

def test_stale_update_known_answer():
    entry = stale_entry(ClientUpdate(4, {"w": torch.tensor([3.0, -1.0])}, 6), 2, {"w": torch.tensor([1.0, 1.0])})
    now = {"w": torch.tensor([10.0, 0.0])}
    update = stale_update(entry, 0.5, now)
    assert update.client_id == 4 and update.num_examples == 3.0
    assert torch.equal(update.tensors["w"], torch.tensor([12.0, -2.0]))  # now + (upload - then)
    plain = stale_update(stale_entry(ClientUpdate(4, {"w": torch.tensor([3.0])}, 6), 2, None), 0.25, None)
    assert torch.equal(plain.tensors["w"], torch.tensor([3.0])) and plain.num_examples == 1.5


def _late_then_absent() -> tuple[int, int]:
    """(round r, client c): c is late in r and does not reply in time in r + 1 (deadline 1, mean 1)."""
    for r in range(1, 200):
        for c in draw_faults(0, r, [0, 1, 2], 0.0, 1.0, 1.0).late:
            if c in draw_faults(0, r + 1, [0, 1, 2], 0.0, 1.0, 1.0).late:
                return r, c
    raise AssertionError("no such round")


def test_stale_policy_applies_rebased_late_update_next_round(fed):
    r, c = _late_then_absent()
    sim = _sim(fed, "fedit", "fl.deadline=1.0", "fl.straggler_policy=stale", "fl.staleness=0.5", f"fl.rounds={r + 1}")
    seen = []
    aggregate = sim.method.aggregate
    sim.method.aggregate = lambda server, updates: seen.append(list(updates)) or aggregate(server, updates)
    state = sim.initial_state()
    state.round = r - 1
    download_then = {k: v.clone() for k, v in state.server.items()}
    rows = sim.run_round(state)
    assert c in _server_row(rows)["late"] and all(u.client_id != c for u in seen[-1])
    entry = next(e for e in state.stale if e["client"] == c)
    assert _equal(entry["reference"], download_then)
    download_now = {k: v.clone() for k, v in state.server.items()}
    rows = sim.run_round(state)
    applied = [u for u in seen[-1] if u.client_id == c]
    assert _server_row(rows)["stale_applied"] == [c] and len(applied) == 1
    assert applied[0].num_examples == 0.5 * len(sim.train_sets[c])
    for k, t in entry["tensors"].items():
        assert torch.equal(applied[0].tensors[k], download_now[k] + (t - download_then[k]))
    dropped = _sim(fed, "fedit", "fl.deadline=1.0", f"fl.rounds={r}")
    state = dropped.initial_state()
    state.round = r - 1
    assert c in _server_row(dropped.run_round(state))["late"] and state.stale is None


# --- resume equivalence --------------------------------------------------------------------------------

RESUME_CASES = {
    # every server-based method (fedtree: tree state, flora: merged base, fedadam: server moments, ...)
    **{m: (m,) for m in available_methods() if not getattr(method_class(m), "decentralized", False)},
    "robust_momentum": ("fedit", "robust.momentum=0.9", "robust.aggregator=[centered_clipping]"),
    "faults": ("fedit", "fl.dropout=0.3", "fl.deadline=1.0", "fl.straggler_policy=stale"),
    "dp_adaptive": ("fedit", "dp.enabled=true", "dp.adaptive=true", "dp.count_noise=1.0",
                    "fl.dropout=0.3"),  # clip norm + accountant
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_checkpoint_equals_uninterrupted(fed, tmp_path, case):
    method, *overrides = RESUME_CASES[case]
    settings = ["fl.rounds=3", "fl.keep_checkpoints=3", "train.optimizer_state=keep", *overrides]
    full = _sim(fed, method, *settings, checkpoint_dir=tmp_path).run()
    ck = read_checkpoint(round_dir(tmp_path, 1))
    assert ck.round == 1 and strip_times(ck.rows) == strip_times([r for r in full.rows if r["round"] == 1])
    carried = {"faults": ck.fields["stale"], "robust_momentum": ck.fields["aggregator"] and any(ck.fields["momentum"]),
               "dp_adaptive": ck.fields.get("dp")}
    assert carried.get(case, True), f"{case}: the checkpoint should carry that state (test set-up)"
    assert method == "flora" or any(o is not None for o in ck.fields["optimizer"])  # AdamW moments kept
    resumed = _sim(fed, method, *settings).run(restore_state(RunState, ck.fields), ck.rows)
    assert strip_times(resumed.rows) == strip_times(full.rows)
    a, b = state_fields(full.state), state_fields(resumed.state)
    assert a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a), case


def test_centralized_reference_gets_no_faults(fed):
    sim = _sim(fed, "centralized", "fl.dropout=0.9", "fl.deadline=0.01", "fl.min_replies=3")
    server = _server_row(sim.run_round(sim.initial_state()))
    assert server["dropped"] == [] and server["late"] == [] and server["replies"] == 1 and not server["skipped"]


def test_fedtree_warmup_waits_for_clients_that_dropped_out(fed, caplog):
    """A client missing from warm-up has no B to place in the tree: warm-up goes on, the run does not stop."""
    r = _round_with_dropout(0.5)
    sim = _sim(fed, "fedtree", "fl.dropout=0.5", f"fl.rounds={r + 3}")
    state = sim.initial_state()
    state.round = r - 1  # the first warm-up round is one where a client drops out
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        sim.run_round(state)
    assert not sim.method.has_tree(state.server)
    assert any("warm-up goes on" in m for m in caplog.messages)
    while not sim.method.has_tree(state.server) and state.round < r + 20:
        sim.run_round(state)
    assert sim.method.has_tree(state.server)  # built once everyone has uploaded
    assert "num_clients" not in state.server and not any(k.startswith("warm.") for k in state.server)
