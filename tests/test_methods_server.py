"""Known answers and properties of FFA-LoRA, FedSA-LoRA, FedProx and the server optimizers.

The contract suite (test_methods_contract.py) already runs every one of these methods end to end;
here each method's own claim is checked: FFA's exact aggregation and frozen A, FedSA's B never
leaving the client, FedProx's pull toward the global adapter, and each server-optimizer update
against numbers worked out by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from fedlora.fl import server_opt
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import ClientUpdate, build_method
from fedlora.fl.methods.fedsa import FedSALoRA
from fedlora.fl.payload import encode


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _server_row(rows: list[dict], rnd: int) -> dict:
    return next(r for r in rows if r["client"] == "server" and r["round"] == rnd)


def _with_steps(fed, local_steps: int, rounds: int = 1):
    """The session federation with other train/fl settings (same data and model, cfg copied)."""
    cfg = dataclasses.replace(fed.cfg, train=dataclasses.replace(fed.cfg.train, local_steps=local_steps),
                              fl=dataclasses.replace(fed.cfg.fl, rounds=rounds))
    other = copy.copy(fed)
    other.cfg = cfg
    return other


def _norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))


# --- FFA-LoRA ----------------------------------------------------------------------------------


def test_ffa_aggregation_is_exact_with_a_shared_a():
    """sum_i p_i B_i A == (sum_i p_i B_i) A; FedIT's per-factor mean is not exact with distinct A_i."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, generator=gen)
    bs = [torch.randn(4, 2, generator=gen) for _ in range(3)]
    counts = [1, 2, 5]
    method = build_method("ffa")
    server = method.init_server({"l.lora_A": a, "l.lora_B": torch.zeros(4, 2)})
    updates = [ClientUpdate(i, {"l.lora_B": b}, n) for i, (b, n) in enumerate(zip(bs, counts))]
    out = method.aggregate(server, updates)
    assert torch.equal(out["l.lora_A"], a)  # A is never aggregated
    p = [n / sum(counts) for n in counts]
    target = sum(pi * b.double() @ a.double() for pi, b in zip(p, bs))
    assert torch.allclose(out["l.lora_B"].double() @ a.double(), target, atol=1e-6)
    # the same clients with their own A_i under FedIT: B_bar A_bar misses the cross terms
    a_i = [torch.randn(2, 3, generator=gen) for _ in bs]
    both = [ClientUpdate(i, {"A": ai, "B": b}, n) for i, (ai, b, n) in enumerate(zip(a_i, bs, counts))]
    fedit = build_method("fedit").aggregate({"A": a, "B": bs[0]}, both)
    exact = sum(pi * b.double() @ ai.double() for pi, b, ai in zip(p, bs, a_i))
    assert not torch.allclose(fedit["B"].double() @ fedit["A"].double(), exact, atol=1e-3)


def test_ffa_a_never_changes_and_b_trains(fed):
    sim = Simulator(fed, "ffa", seed=0)
    state = sim.initial_state()
    a0 = {k: v.clone() for k, v in state.server.items() if k.endswith("lora_A")}
    b0 = {k: v.clone() for k, v in state.server.items() if k.endswith("lora_B")}
    assert a0 and all(_equal(c, a0) for c in state.clients)  # every client holds the same A
    for _ in range(2):
        sim.run_round(state)
        assert _equal({k: state.server[k] for k in a0}, a0)
        assert all(_equal(c, a0) for c in state.clients)
        assert all(not torch.equal(state.server[k], b0[k]) for k in b0)


def test_ffa_sends_only_b_and_about_half_of_fedit_bytes(fed):
    ffa = Simulator(fed, "ffa", seed=0)
    state = ffa.initial_state()
    assert all(k.endswith("lora_B") for k in ffa.method.download(state.server, 0))
    ffa_rows = ffa.run().rows
    fedit_rows = Simulator(fed, "fedit", seed=0).run().rows
    init = state.server
    share = sum(v.numel() for k, v in init.items() if k.endswith("lora_B")) / sum(v.numel() for v in init.values())
    for direction in ("bytes_down", "bytes_up"):
        ratio = _server_row(ffa_rows, 1)[direction] / _server_row(fedit_rows, 1)[direction]
        assert abs(ratio - share) < 0.05, (direction, ratio, share)  # B's share, plus headers
        assert 0.3 < ratio < 0.6


# --- FedSA-LoRA --------------------------------------------------------------------------------


class _RecordingFedSA(FedSALoRA):
    """FedSA that records the names of every payload it builds (not registered)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.sent: list[set[str]] = []

    def download(self, server, client_id):
        out = super().download(server, client_id)
        self.sent.append(set(out))
        return out

    def upload(self, trained, client):
        payload, client = super().upload(trained, client)
        self.sent.append(set(payload))
        return payload, client


def test_fedsa_b_never_leaves_the_client(fed):
    method = _RecordingFedSA()
    sim = Simulator(fed, method, seed=0)
    state = sim.initial_state()
    b0 = state.clients[0]
    result = sim.run(state)
    assert method.sent and all(names and all(n.endswith("lora_A") for n in names) for names in method.sent)
    assert state.server and all(k.endswith("lora_A") for k in state.server)
    assert all(c and all(k.endswith("lora_B") for k in c) for c in state.clients)
    # every client's B trained, and the Bs differ from client to client
    for i, ci in enumerate(state.clients):
        assert all(not torch.equal(ci[k], b0[k]) for k in b0)
        for cj in state.clients[i + 1:]:
            assert not _equal(ci, cj)
    # scored per client with (A_global, B_i); no global adapter
    personal = method.personal_adapter(state.server, state.clients[1])
    assert set(personal) == set(state.server) | set(state.clients[1])
    assert method.global_adapter(state.server) is None and result.final("global") is None


# --- FedProx -----------------------------------------------------------------------------------


def test_fedprox_term_known_answer():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    other = torch.nn.Parameter(torch.tensor([7.0]))  # trainable but not received: no anchor
    received = {"w": torch.tensor([0.0, 4.0]), "frozen": torch.tensor([0.0])}
    term = build_method("fedprox", {"mu": 0.5}).extra_loss({"w": w, "frozen": frozen, "other": other}, received)
    value = term()
    assert value.item() == pytest.approx(0.25 * (1 + 4))  # (mu/2) ||w - w_g||^2, frozen excluded
    value.backward()
    assert torch.allclose(w.grad, torch.tensor([0.5, -1.0]))  # mu (w - w_g)
    assert other.grad is None
    assert build_method("fedprox", {"mu": 0.0}).extra_loss({"w": w}, received) is None
    with pytest.raises(ValueError, match="mu"):
        build_method("fedprox", {"mu": -1.0})


def test_fedprox_mu_zero_is_fedit_and_large_mu_stays_closer(fed):
    fed5 = _with_steps(fed, local_steps=5)  # with 1 step the term's gradient is 0 (w starts at w_g)
    start = Simulator(fed5, "fedit", seed=0).initial_state().server
    ends = {}
    for name, options in {"fedit": {}, "mu0": {"mu": 0.0}, "mu10": {"mu": 10.0}}.items():
        method = build_method("fedit" if name == "fedit" else "fedprox", options)
        ends[name] = Simulator(fed5, method, seed=0).run().state.server
    assert _equal(ends["mu0"], ends["fedit"])
    assert _norm(ends["mu10"], start) < 0.5 * _norm(ends["mu0"], start)


# --- server optimizers: pure update rules ------------------------------------------------------


def _steps(opt: server_opt.ServerOptimizer, deltas: list[list[float]]) -> tuple[list[torch.Tensor], dict]:
    state = opt.init({"w": torch.zeros(len(deltas[0]), dtype=torch.float64)})
    steps = []
    for d in deltas:
        step, state = opt.update({"w": torch.tensor(d, dtype=torch.float64)}, state)
        steps.append(step["w"])
    return steps, state


def _close(t: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(t, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fedavgm_known_answer():
    steps, state = _steps(server_opt.fedavgm(server_lr=0.5, beta1=0.9), [[0.2, 0.4], [-0.1, 0.0]])
    assert _close(steps[0], [0.1, 0.2])            # m = [0.2, 0.4]
    assert _close(steps[1], [0.04, 0.18])          # m = 0.9 [0.2, 0.4] + [-0.1, 0] = [0.08, 0.36]
    assert set(state) == {"m.w"}


def test_fedadagrad_known_answer():
    opt = server_opt.fedadagrad(server_lr=0.1, beta1=0.5, tau=0.1, v0=0.0)
    steps, state = _steps(opt, [[2.0, -1.0], [0.0, 3.0]])
    assert _close(steps[0], [0.1 * 1.0 / 2.1, 0.1 * -0.5 / 1.1])                  # m=[1,-.5], v=[4,1]
    assert _close(steps[1], [0.1 * 0.5 / 2.1, 0.1 * 1.25 / (math.sqrt(10) + 0.1)])  # m=[.5,1.25], v=[4,10]
    assert _close(state["v.w"], [4.0, 10.0])


def test_fedadam_known_answer():
    opt = server_opt.fedadam(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.1, v0=0.0)
    steps, state = _steps(opt, [[2.0, -1.0], [0.0, 3.0]])
    assert _close(steps[0], [0.1 * 1.0 / 1.1, 0.1 * -0.5 / 0.6])  # v = 0.25 [4, 1] = [1, 0.25]
    # v = 0.75 [1, 0.25] + 0.25 [0, 9] = [0.75, 2.4375]; m = [0.5, 1.25]
    assert _close(steps[1], [0.1 * 0.5 / (math.sqrt(0.75) + 0.1), 0.1 * 1.25 / (math.sqrt(2.4375) + 0.1)])
    assert _close(state["v.w"], [0.75, 2.4375]) and _close(state["m.w"], [0.5, 1.25])


def test_fedyogi_known_answer():
    opt = server_opt.fedyogi(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.1, v0=1.0)
    steps, state = _steps(opt, [[2.0, 0.5]])
    # Delta^2 = [4, 0.25]; sign(v - Delta^2) = [-1, +1]; v = 1 - 0.25 [4, 0.25] [-1, 1] = [2, 0.9375]
    assert _close(state["v.w"], [2.0, 0.9375])
    assert _close(steps[0], [0.1 * 1.0 / (math.sqrt(2) + 0.1), 0.1 * 0.25 / (math.sqrt(0.9375) + 0.1)])


def test_adaptive_v_starts_at_tau_squared_and_options_are_checked():
    state = server_opt.fedadam(tau=0.01).init({"w": torch.zeros(2)})
    assert torch.allclose(state["v.w"], torch.full((2,), 1e-4)) and torch.equal(state["m.w"], torch.zeros(2))
    for bad in ({"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}, {"server_lr": 0.0}, {"v0": -1.0}):
        with pytest.raises(ValueError):
            build_method("fedadam", bad)
    with pytest.raises(ValueError, match="'beta2'"):
        build_method("fedavgm", {"beta2": 0.9})


# --- server optimizers: as methods -------------------------------------------------------------


def test_fedopt_method_aggregate_known_answer():
    method = build_method("fedadam", {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.1, "v0": 0.0})
    server = method.init_server({"w": torch.tensor([1.0, 1.0])})
    assert set(server) == {"w", "opt.m.w", "opt.v.w"}
    updates = [ClientUpdate(0, {"w": torch.tensor([4.0, 0.0])}, 1), ClientUpdate(1, {"w": torch.tensor([2.0, 0.0])}, 1)]
    out = method.aggregate(server, updates)  # Delta = [3, 0] - [1, 1] = [2, -1], as in the FedAdam answer
    assert torch.allclose(out["w"], torch.tensor([1 + 0.1 / 1.1, 1 - 0.05 / 0.6]))
    assert torch.allclose(out["opt.v.w"], torch.tensor([1.0, 0.25])) and out["opt.v.w"].dtype == torch.float32
    assert set(method.download(out, 0)) == {"w"} and set(method.global_adapter(out)) == {"w"}


def test_fedavgm_without_momentum_is_fedit_exactly(fed):
    gen = torch.Generator().manual_seed(1)
    server = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, 3, generator=gen)}
    updates = [ClientUpdate(i, {k: v + torch.randn(v.shape, generator=gen) for k, v in server.items()}, i + 1)
               for i in range(3)]
    plain = build_method("fedavgm", {"beta1": 0.0, "server_lr": 1.0})
    out = plain.aggregate(plain.init_server(server), updates)
    assert _equal(plain.global_adapter(out), build_method("fedit").aggregate(server, updates))
    # and end to end: the same rows' adapters, round after round
    ref = Simulator(fed, "fedit", seed=0).run()
    avgm = Simulator(fed, plain, seed=0).run()
    assert _equal(plain.global_adapter(avgm.state.server), ref.state.server)


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_moments_are_kept_but_never_downloaded(fed, name):
    sim = Simulator(fed, name, seed=0)
    state = sim.initial_state()
    adapter_keys = set(Simulator(fed, "fedit", seed=0).initial_state().server)
    rows = sim.run_round(state)
    moments = {"m"} if name == "fedavgm" else {"m", "v"}
    assert set(state.server) == adapter_keys | {f"opt.{m}.{k}" for m in moments for k in adapter_keys}
    assert any(state.server[f"opt.m.{k}"].abs().sum() > 0 for k in adapter_keys)
    sent = sim.method.download(state.server, 0)
    assert set(sent) == adapter_keys
    assert _server_row(rows, 1)["bytes_down"] == len(fed.clients) * len(encode(sent))
