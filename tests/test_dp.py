"""DP-FedAvg (fl/dp.py): the no-privacy limit, clipping, noise statistics, adaptive clipping, the
accountant against published answers, and runs through the simulator."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from conftest import make_config, strip_times
from fedlora.config import ConfigError, DPConfig, RobustConfig
from fedlora.experiment import resume, run
from fedlora.fl.checkpoint import read_checkpoint, round_dir
from fedlora.fl import dp as dpm
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import ClientUpdate


def _fed(fed, rounds: int = 2, robust: RobustConfig | None = None, **dp):
    cfg = dataclasses.replace(fed.cfg, fl=dataclasses.replace(fed.cfg.fl, rounds=rounds),
                              dp=DPConfig(enabled=True, **dp), robust=robust or RobustConfig())
    return dataclasses.replace(fed, cfg=cfg)


def _uploads(sim, server, deltas: list[float] | None = None, seed: int = 0) -> list[ClientUpdate]:
    """One upload per sampled client: the download plus a random (or a constant) change, equal counts."""
    ref = sim.reference(server, 0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(sim.num_sampled):
        if deltas is None:
            t = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}
        else:
            t = {k: v + deltas[i] for k, v in ref.items()}
        out.append(ClientUpdate(i, t, 7))
    return out


def _server_rows(result) -> list[dict]:
    return [r for r in result.rows if r["client"] == "server"]


# ---------------------------------------------------------------- the mechanism


@pytest.mark.parametrize("method", ["fedit", "ffa", "fedsa", "fedadam"])
def test_no_noise_no_clipping_is_the_plain_mean(fed, method):
    """z = 0 and C = inf: DP-FedAvg is the method's own aggregation (equal example counts, so the
    example-weighted mean is the uniform one)."""
    sim = Simulator(_fed(fed, noise_multiplier=0.0, clip=math.inf), method)
    state = sim.initial_state()
    updates = _uploads(sim, state.server)
    expected = sim.method.aggregate(state.server, updates)
    got = sim.aggregate(state, updates, 1)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-7, rtol=1e-6)
    assert state.dp["history"] == [[0.0, 1.0, 1]] and sim.dp_metrics(state)["epsilon"] == math.inf


def test_clipping_closed_form():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    clipped, norms = dpm.clip_rows_with_norms(x, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64))
    mean, _ = dpm.noised_mean(x, 1.0, 0.0, 4, None)  # denominator m = 4 (fixed), not the 3 rows
    torch.testing.assert_close(mean, torch.tensor([0.9 / 4, 1.2 / 4], dtype=torch.float64))


def test_clipping_is_over_all_uploaded_tensors(fed):
    """Client i adds c_i to every entry: ||Delta_i|| = c_i sqrt(D) over the flattened upload, so the
    server adds mean_i c_i min(1, C / (c_i sqrt(D))) to every entry."""
    sim = Simulator(_fed(fed, noise_multiplier=0.0, clip=0.5), "fedit")
    state = sim.initial_state()
    d = sum(v.numel() for v in state.server.values())
    cs = [0.001, 0.02, 0.5]
    got = sim.aggregate(state, _uploads(sim, state.server, cs), 1)
    shift = sum(c * min(1.0, 0.5 / (c * math.sqrt(d))) for c in cs) / 3
    for k, v in got.items():
        torch.testing.assert_close(v - state.server[k], torch.full_like(v, shift), atol=1e-6, rtol=1e-4)


def test_noise_std_matches_z_c_over_m():
    z, clip, m, d = 1.3, 0.7, 4, 200_000
    gen = torch.Generator().manual_seed(0)
    mean, _ = dpm.noised_mean(torch.zeros(m, d, dtype=torch.float64), clip, z * clip, m, gen)
    expected = z * clip / m
    assert abs(float(mean.std()) / expected - 1) < 0.10
    assert abs(float(mean.mean())) < 0.01 * expected


def test_simulator_noise_std_and_reproducibility(fed):
    """Uploads equal to the download: what the server adds is the noise alone, std z C / m."""
    sim = Simulator(_fed(fed, noise_multiplier=2.0, clip=0.5), "fedit")
    state = sim.initial_state()
    server0 = {k: v.clone() for k, v in state.server.items()}
    got = sim.aggregate(state, _uploads(sim, server0, [0.0] * sim.num_sampled), 1)
    noise = torch.cat([(got[k] - server0[k]).reshape(-1) for k in sorted(got)])
    assert noise.numel() > 1000
    assert abs(float(noise.std()) / (2.0 * 0.5 / sim.num_sampled) - 1) < 0.10
    again = Simulator(_fed(fed, noise_multiplier=2.0, clip=0.5), "fedit")
    state2 = again.initial_state()
    got2 = again.aggregate(state2, _uploads(again, server0, [0.0] * again.num_sampled), 1)
    assert all(torch.equal(got[k], got2[k]) for k in got)  # noise from (seed, round, salt)


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_clip_known_answers():
    # Geometric step: C exp(-eta (b - gamma)).
    assert dpm.next_clip(0.1, 1.0, 0.5, 0.2) == pytest.approx(0.1 * math.exp(-0.1))
    assert dpm.next_clip(0.1, 0.0, 0.5, 0.2) == pytest.approx(0.1 * math.exp(0.1))
    assert dpm.next_clip(0.1, 0.5, 0.5, 0.2) == pytest.approx(0.1)
    # Unclipped fraction without noise: ||x|| <= C counts (the boundary included), over m.
    norms = torch.tensor([0.5, 1.0, 2.0, 3.0])
    assert dpm.unclipped_fraction(norms, 1.0, 0.0, 4, None) == 0.5
    # Fixed m with the paper's shift b_i - 1/2: a missing client counts 1/2 (4 of m = 8 missing).
    assert dpm.unclipped_fraction(norms, 1.0, 0.0, 8, None) == 0.5
    assert dpm.unclipped_fraction(norms[:3], 1.0, 0.0, 4, None) == pytest.approx((2 - 1.5) / 4 + 0.5)
    assert dpm.unclipped_fraction(norms, 10.0, 0.0, 2, None) == 1.0  # clamped to [0, 1]
    # Noised fraction: (2 - 2 + sigma_b N) / m + 1/2 with the same draw.
    draw = float(torch.randn((), generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    got = dpm.unclipped_fraction(norms, 1.0, 0.3, 4, torch.Generator().manual_seed(5))
    assert got == pytest.approx(0.3 * draw / 4 + 0.5)
    # Noise split: z^-2 = z_update^-2 + (2 sigma_b)^-2.
    z_upd = dpm.update_noise_multiplier(1.0, 100 / 20)
    assert z_upd == pytest.approx((1 - 0.01) ** -0.5)
    assert z_upd ** -2 + (2 * 5) ** -2 == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="count_noise"):
        dpm.update_noise_multiplier(1.0, 0.5)


def test_adaptive_clipping_in_a_run(fed):
    sim = Simulator(_fed(fed, rounds=3, noise_multiplier=0.5, clip=0.01, adaptive=True, count_noise=1.0), "fedit")
    assert sim.dp.z_update == pytest.approx((0.5 ** -2 - 2.0 ** -2) ** -0.5)
    result = sim.run()
    rows = _server_rows(result)
    clips = [r["dp_clip"] for r in rows] + [result.state.dp["clip"]]
    for r, before, after in zip(rows, clips, clips[1:]):
        assert after == pytest.approx(dpm.next_clip(before, r["dp_unclipped_fraction"], 0.5, 0.2))
    assert result.state.dp["history"] == [[0.5, 1.0, 3]]  # accounted with z, not z_update


def test_adaptive_needs_enough_count_noise(fed):
    with pytest.raises(ConfigError, match="count_noise"):
        Simulator(_fed(fed, noise_multiplier=1.0, adaptive=True, count_noise=0.4), "fedit")
    # Default sigma_b = m / 20 = 0.15 with 3 clients: too little for z = 1.
    with pytest.raises(ConfigError, match="count_noise"):
        Simulator(_fed(fed, noise_multiplier=1.0, adaptive=True), "fedit")


# ---------------------------------------------------------------- accountant


def test_accountant_opacus_docs_example():
    """Opacus' compute_dp_sgd_privacy docs (https://opacus.ai/api/compute_dp_sgd_privacy.html):
    sample rate 1 %, noise multiplier 1.0, 3 epochs = 300 steps, alphas 2 5 10 20 100 ->
    epsilon = 2.39 at delta = 1e-5, optimal alpha 5.0."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 300)]
    eps, alpha = acc.get_privacy_spent(delta=1e-5, alphas=[2, 5, 10, 20, 100])
    assert round(eps, 2) == 2.39 and alpha == 5.0


def test_accountant_opacus_reference_values():
    """opacus tests/accountants_test.py: sigma 1.5, q 0.04, delta 1e-5; RDP over 2250 steps gives
    7.32911117143, PRV over 2249 steps 6.777395712150674."""
    assert dpm.epsilon([[1.5, 0.04, 2250]], 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-9)
    assert dpm.epsilon([[1.5, 0.04, 2249]], 1e-5, "prv") == pytest.approx(6.777395712150674, abs=1e-6)


def test_accountant_full_participation_matches_the_analytic_gaussian():
    """q = 1: T rounds of the Gaussian mechanism are mu-GDP with mu = sqrt(T) / z, and
    delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) (Balle & Wang 2018; Dong et al. 2019).
    PRV is tight (within its 0.01 epsilon error); RDP is a valid upper bound."""
    z, t, delta = 1.0, 10, 1e-5
    mu = math.sqrt(t) / z
    exact = brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 100)
    history = [[z, 1.0, t]]
    assert dpm.epsilon(history, delta, "prv") == pytest.approx(exact, abs=0.02)
    assert exact <= dpm.epsilon(history, delta, "rdp") <= 1.1 * exact


def test_history_merges_equal_steps_and_zero_noise_is_infinite():
    h = dpm.with_step(dpm.with_step([], 1.0, 0.5), 1.0, 0.5)
    assert h == [[1.0, 0.5, 2]]
    assert dpm.with_step(h, 2.0, 0.5) == [[1.0, 0.5, 2], [2.0, 0.5, 1]]
    assert h == [[1.0, 0.5, 2]]  # not mutated
    assert dpm.epsilon([], 1e-5) == 0.0 and dpm.epsilon([[0.0, 1.0, 1]], 1e-5) == math.inf
    assert dpm.default_delta(10) == 1e-5 and dpm.default_delta(10**6) == pytest.approx(10 ** -6.6)


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("method", ["fedit", "ffa", "fedadam"])
def test_dp_runs_log_epsilon_every_round(fed, method):
    result = Simulator(_fed(fed, rounds=2, noise_multiplier=1.0, clip=0.05), method).run()
    rows = _server_rows(result)
    assert [r["round"] for r in rows] == [1, 2]
    eps = [r["epsilon"] for r in rows]
    assert eps == [pytest.approx(dpm.epsilon([[1.0, 1.0, k]], 1e-5)) for k in (1, 2)]
    assert 0 < eps[0] < eps[1] < math.inf and all(r["delta"] == 1e-5 for r in rows)
    assert all(torch.isfinite(v).all() for v in result.state.server.values())
    json.dumps(result.state.dp)  # checkpointable as JSON


def test_stops_before_passing_the_target_epsilon(fed):
    eps = [dpm.epsilon([[1.0, 1.0, k]], 1e-5) for k in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2
    sim = Simulator(_fed(fed, rounds=5, noise_multiplier=1.0, target_epsilon=target), "fedit")
    result = sim.run()
    assert result.state.round == 2 and [r["round"] for r in _server_rows(result)] == [1, 2]
    assert _server_rows(result)[-1]["epsilon"] <= target
    summary = sim.dp_summary(result.state)["dp"]
    assert summary["stopped_early"] and summary["rounds_accounted"] == 2


def test_target_below_one_round_fails_before_the_run(fed):
    with pytest.raises(ConfigError, match="single round"):
        Simulator(_fed(fed, noise_multiplier=1.0, target_epsilon=0.5), "fedit")


def test_resume_draws_the_same_noise(fed):
    """The DP state is JSON and the noise is derived from (seed, round): 1 round + resume = 2 rounds."""
    opts = dict(rounds=2, noise_multiplier=0.5, clip=0.01, adaptive=True, count_noise=1.0)
    full = Simulator(_fed(fed, **opts), "fedit").run()
    first = Simulator(_fed(fed, **opts), "fedit")
    state = first.initial_state()
    first.run_round(state)
    state.dp = json.loads(json.dumps(state.dp))
    resumed = Simulator(_fed(fed, **opts), "fedit").run(state)
    assert resumed.state.dp == full.state.dp
    assert all(torch.equal(resumed.state.server[k], full.state.server[k]) for k in full.state.server)


@pytest.mark.parametrize("method", ["flora", "fedtree", "local", "centralized"])
def test_methods_without_a_mean_are_rejected_before_the_run(fed, method):
    with pytest.raises(ConfigError, match=f"dp cannot apply to method '{method}'"):
        Simulator(_fed(fed), method)


def test_incompatible_settings_are_rejected():
    from fedlora.fl.preflight import preflight

    # Pairs are composition rules (fl/combine.py): refused by preflight, before any model is loaded.
    with pytest.raises(ConfigError, match="robust.aggregator"):
        preflight(make_config("dp.enabled=true", "robust.aggregator=[median]"))
    with pytest.raises(ConfigError, match="straggler_policy"):
        preflight(make_config("dp.enabled=true", "fl.straggler_policy=stale"))
    with pytest.raises(ConfigError, match="noise_multiplier=0"):
        make_config("dp.enabled=true", "dp.clip=.inf")
    with pytest.raises(ConfigError, match="dp.accountant"):
        make_config("dp.enabled=true", "dp.accountant=moments")
    with pytest.raises(ConfigError, match="unknown config key dp.sigma"):
        make_config("dp.sigma=1")


def test_summary_and_metrics_carry_epsilon(tmp_path):
    cfg = make_config("dp.enabled=true", "dp.noise_multiplier=1.0", "dp.accountant=prv", "eval.zero_shot=false",
                      "eval.baseline=none", output_dir=tmp_path)
    run_dir = run(cfg, quiet=True)
    summary = json.loads(next(run_dir.rglob("summary.json")).read_text())
    assert summary["dp"]["epsilon"] == pytest.approx(dpm.epsilon([[1.0, 1.0, 2]], 1e-5, "prv"))
    assert summary["dp"]["rounds_accounted"] == 2 and not summary["dp"]["stopped_early"]
    rows = [json.loads(line) for line in next(run_dir.rglob("metrics.jsonl")).read_text().splitlines()]
    assert [r["epsilon"] > 0 for r in rows if r["client"] == "server"] == [True, True]


def test_checkpoint_and_resume_keep_the_dp_state(tmp_path):
    """The clip norm and accountant history travel in the checkpoint: a resumed run equals the run."""
    cfg = make_config("run_name=dp", "fl.rounds=3", "dp.enabled=true", "dp.noise_multiplier=0.5", "dp.clip=0.01",
                      "dp.adaptive=true", "dp.count_noise=1.0", "eval.zero_shot=false", "eval.baseline=none",
                      output_dir=tmp_path)
    run_dir = run(cfg, quiet=True)

    def outputs() -> tuple[list[dict], dict]:
        rows = strip_times([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.pop("wall_seconds")
        return rows, summary

    expected = outputs()
    saved = read_checkpoint(round_dir(run_dir / "checkpoints", 2)).fields["dp"]
    assert saved["history"] == [[0.5, 1.0, 2]] and saved["clip"] != 0.01
    newest = round_dir(run_dir / "checkpoints", 3) / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # corrupted: round 3 is run again from round 2
    resume(run_dir, quiet=True)
    assert outputs() == expected


def test_clipping_bounds_a_byzantine_client_and_momentum_combines(fed):
    """DP composes with the robust section's attacks and worker momentum (not with its chains): with
    z = 0 the server's step is a mean of m vectors of norm <= C, so a sign-flip x 1000 moves it <= C."""
    attack = RobustConfig(byzantine=1, attack="sign_flip", attack_args={"scale": 1000.0})
    sim = Simulator(_fed(fed, rounds=1, robust=attack, noise_multiplier=0.0, clip=0.01), "fedit")
    start = sim.initial_state().server
    result = sim.run()
    step = math.sqrt(sum(float((result.state.server[k] - start[k]).double().square().sum()) for k in start))
    assert 0 < step <= 0.01 + 1e-6
    with pytest.raises(ConfigError, match="robust.aggregator"):
        Simulator(_fed(fed, robust=RobustConfig(aggregator=["mean"])), "fedit")
    stale = dataclasses.replace(_fed(fed), cfg=dataclasses.replace(
        _fed(fed).cfg, fl=dataclasses.replace(fed.cfg.fl, straggler_policy="stale")))
    with pytest.raises(ConfigError, match="straggler_policy"):
        Simulator(stale, "fedit")
    momentum = Simulator(_fed(fed, rounds=2, robust=RobustConfig(momentum=0.9), noise_multiplier=1.0), "fedit").run()
    assert [r["round"] for r in _server_rows(momentum) if "epsilon" in r] == [1, 2]
