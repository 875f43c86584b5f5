"""User-level differential privacy: DP-FedAvg with fixed or adaptive clipping, and its accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, arXiv 1710.06963), server side, config `dp` (docs/privacy.md):

- What is clipped. Client i's update Delta_i = upload_i - download, every uploaded tensor flattened
  (sorted by name) into one vector, is clipped in L2 norm ("flat clipping"):
      Delta_i <- Delta_i * min(1, C / ||Delta_i||).
- What is sent. The method's usual upload (a real deployment clips on the client, or inside a
  trusted aggregator; the simulator clips what the server decodes, which gives the same sum).
- How it is combined. With m = qN the expected number of clients per round (under Poisson
  sampling, the default with DP, each client joins a round with probability q; under fixed-size
  sampling exactly m of N join) and uniform weights w_i = 1:
      Delta = (sum_i clipped Delta_i + N(0, (z C)^2 I)) / m,
  the paper's fixed-denominator estimator f_f with W = N, q = m / N (so qW = m); the noise on the
  average has std z C / m per coordinate. Example counts are NOT used as weights: a client's
  influence must be bounded by C / m whatever it reports (the paper's capped weights
  min(n_i / n_cap, 1) equal 1 once every client holds n_cap examples). Rejected uploads add
  nothing to the sum (and 1/2, neutral, to the shifted count below); the denominator stays m.
  The method then runs its server step on the single update download + Delta (FedIT, FedProx,
  FFA, FedSA: that is the new global; FedAvgM/FedAdam/...: Delta is the server optimizer's
  pseudo-gradient, post-processing at no privacy cost).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021, arXiv 1905.03871, Algorithm 1 with the geometric update):
each sampled client also contributes b_i = 1[||Delta_i|| <= C] - 1/2 (sensitivity 1/2), and
      b = (sum_i b_i + N(0, sigma_b^2)) / m + 1/2,  clamped to [0, 1],
      C <- C * exp(-eta (b - gamma)),
so C moves toward the gamma-quantile of the update norms. The two Gaussian queries together equal
one Gaussian mechanism with the configured z when the update noise uses
      z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)     (needs 2 sigma_b > z),
so the accountant sees z. Defaults from the paper: gamma = 0.5, eta = 0.2, sigma_b = m / 20,
initial C = 0.1. The update is clipped and noised with the C of the round's start.

Accounting (`fl/accounting.py`). One subsampled Gaussian mechanism per round with noise
multiplier z and rate q, accounted for the sampler the engine actually used (`fl.sampling`):
Poisson sampling (the default when DP is on) with opacus' RDP (or PRV) accountant under
add/remove-one-client adjacency; fixed-size sampling with the RDP bound for sampling without
replacement (dp_accounting) under replace-one adjacency. The run's privacy report (summary.json)
states which. epsilon at delta (default min(1e-5, N^-1.1), "delta below 1/N") is logged in every
server row. Under Poisson sampling a round releases its noised mean even when nobody was sampled
(the mechanism analysed), so `fl.min_replies` does not apply to DP rounds. With
`dp.target_epsilon` the run stops before a round that would take epsilon past it.

What leaves a client must all be covered: a payload side channel that DP does not clip and noise
(Concordia's utility scorers) makes the run refuse DP before round 1 (fl/combine.py).

State (RunState.dp, JSON-serializable): {"clip": current C, "history": [[z, q, rounds], ...]};
the accountant is rebuilt from the history. Noise comes from the named streams `dp_noise` and
`dp_count` (fl/streams.py), so a run is reproducible and a resumed run draws the same noise.

>>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
>>> clip_rows_with_norms(x, 1.0)[0].tolist()       # [3, 4] / 5 and [0.3, 0.4] unchanged
[[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fedlora.config import ConfigError
from fedlora.fl.accounting import accountant_description, default_delta, epsilon, with_step
from fedlora.fl.combine import RoundContext, Transform, flat_deltas, unflatten_like
from fedlora.fl.methods import ClientUpdate

log = logging.getLogger("fedlora")


# ---------------------------------------------------------------- the mechanism on tensors


def clip_rows_with_norms(x: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows x_i * min(1, C / ||x_i||), the norms ||x_i|| before clipping); C = inf clips nothing."""
    norms = torch.linalg.vector_norm(x, dim=1)
    if math.isinf(clip):
        return x, norms
    scale = torch.clamp(clip / norms, max=1.0)
    scale = torch.where(norms > 0, scale, torch.ones_like(scale))
    return x * scale.unsqueeze(1), norms


def noised_mean(x: torch.Tensor, clip: float, noise_std: float, denominator: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i clip(x_i) + N(0, noise_std^2 I)) / denominator, and the norms of the rows.

    `noise_std` is the std on the SUM (z C); noise is drawn only when it is > 0.
    """
    clipped, norms = clip_rows_with_norms(x, clip)
    total = clipped.sum(dim=0)
    if noise_std > 0:
        total = total + noise_std * torch.randn(total.shape, generator=generator, dtype=total.dtype)
    return total / denominator, norms


def unclipped_fraction(norms: torch.Tensor, clip: float, count_std: float, expected: int,
                       generator: torch.Generator | None) -> float:
    """b = (sum_i (1[||x_i|| <= C] - 1/2) + N(0, sigma_b^2)) / m + 1/2, clamped to [0, 1]."""
    shifted = float((norms <= clip).to(torch.float64).sum()) - 0.5 * len(norms)
    if count_std > 0:
        shifted += count_std * float(torch.randn((), generator=generator, dtype=torch.float64))
    return min(1.0, max(0.0, shifted / expected + 0.5))


def next_clip(clip: float, fraction: float, target_quantile: float, clip_lr: float) -> float:
    """Geometric update C * exp(-eta (b - gamma)) (Andrew et al. 2021)."""
    return clip * math.exp(-clip_lr * (fraction - target_quantile))


def update_noise_multiplier(z: float, count_std: float) -> float:
    """z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of the privacy budget z."""
    if z == 0:
        return 0.0
    if count_std == 0 or 2 * count_std <= z:
        raise ConfigError(f"adaptive clipping needs 2 * dp.count_noise > dp.noise_multiplier "
                          f"(got count_noise={count_std:g}, noise_multiplier={z:g}): raise count_noise")
    return (z ** -2 - (2 * count_std) ** -2) ** -0.5


# ---------------------------------------------------------------- the combine transform


@dataclass(frozen=True)
class DPSetup:
    z: float             # noise multiplier the accountant sees
    z_update: float      # noise multiplier of the update (z, or z_update with adaptive clipping)
    count_std: float     # sigma_b (0 without adaptive clipping)
    m: float             # expected clients per round, qN: the fixed denominator
    q: float             # sampling rate
    delta: float
    sampling: str        # 'poisson' or 'fixed' (fl.sampling as resolved)
    population: int      # N


class DPMean(Transform):
    """DP-FedAvg's clipped, noised mean in place of the method's weighted mean (config `dp`)."""

    name, stage = "dp", 40

    def __init__(self, cfg, num_clients: int, q: float, sampling: str, m: float):
        """m: the denominator, exactly the clients per round (fixed) or its expectation qN (Poisson)."""
        self.cfg = cfg
        count_std, z_update = 0.0, cfg.noise_multiplier
        if cfg.adaptive:
            count_std = m / 20 if cfg.count_noise is None else cfg.count_noise
            z_update = update_noise_multiplier(cfg.noise_multiplier, count_std)
        delta = default_delta(num_clients) if cfg.delta is None else cfg.delta
        self.setup = DPSetup(cfg.noise_multiplier, z_update, count_std, m, q, delta, sampling, num_clients)
        self.epsilon([])  # an accountant that cannot account this sampler fails here, before round 1
        if cfg.target_epsilon is not None:
            first = self.epsilon(with_step([], self.setup.z, self.setup.q))
            if first > cfg.target_epsilon:
                raise ConfigError(f"dp.target_epsilon={cfg.target_epsilon:g} is below the epsilon of a single "
                                  f"round ({first:.4g} at delta={delta:g}): raise it or dp.noise_multiplier")

    def initial(self) -> dict:
        return {"clip": float(self.cfg.clip), "history": []}

    def epsilon(self, history: list) -> float:
        s = self.setup
        return epsilon(history, s.delta, self.cfg.accountant, s.sampling, s.population)

    def apply(self, updates, st, ctx: RoundContext):
        """Clip each update, sum, add noise, divide by m; one update download + that mean."""
        dp, cfg = self.setup, self.cfg
        st = dict(st or self.initial())
        if updates:
            ref, keys, deltas = flat_deltas(ctx.method, updates, ctx, "differential privacy")
        else:  # nobody arrived: the mechanism still releases its noise (Poisson sampling's analysis)
            ref = ctx.reference(ctx.sampled[0] if ctx.sampled else 0)
            keys, deltas = sorted(ref), []
        width = sum(ref[k].numel() for k in keys)
        x = (torch.stack([torch.cat([d[k].to(torch.float64).reshape(-1) for k in keys]) for d in deltas])
             if deltas else torch.zeros((0, width), dtype=torch.float64))
        clip = st["clip"]
        noise_std = dp.z_update * clip if dp.z_update > 0 else 0.0  # z = 0 with C = inf: no noise, not NaN
        mean, norms = noised_mean(x, clip, noise_std, dp.m, ctx.streams.torch("dp_noise", ctx.round_index))
        ctx.notes["dp_clip"] = clip
        if cfg.adaptive:
            fraction = unclipped_fraction(norms, clip, dp.count_std, dp.m, ctx.streams.torch("dp_count", ctx.round_index))
            st["clip"] = next_clip(clip, fraction, cfg.target_quantile, cfg.clip_lr)
            ctx.notes["dp_unclipped_fraction"] = fraction  # the noised estimate, safe to publish
        st["history"] = with_step(st["history"], dp.z, dp.q)
        out = {k: (ref[k].to(torch.float64) + v).to(torch.float32) for k, v in unflatten_like(mean, ref, keys).items()}
        return [ClientUpdate(-1, out, max(1, sum(u.num_examples for u in updates)))], st

    # --- what the run reports ------------------------------------------------------------------
    def metrics(self, st: dict | None) -> dict:
        """epsilon spent so far at delta (the DP fields of a server row)."""
        history = (st or self.initial())["history"]
        return {"epsilon": self.epsilon(history), "delta": self.setup.delta}

    def would_exceed(self, st: dict | None, rounds_done: int, rounds: int) -> bool:
        """True when the next round would take epsilon past dp.target_epsilon (the run stops)."""
        target = self.cfg.target_epsilon
        if target is None:
            return False
        after = self.epsilon(with_step((st or self.initial())["history"], self.setup.z, self.setup.q))
        if after > target:
            log.warning("dp: stopping after round %d of %d: one more round would take epsilon to %.4g > "
                        "dp.target_epsilon=%.4g", rounds_done, rounds, after, target)
            return True
        return False

    def summary(self, st: dict | None, stopped_early: bool) -> dict:
        """{"dp": {...}} for summary.json: the privacy report."""
        st, cfg, s = st or self.initial(), self.cfg, self.setup
        return {"dp": {
            "epsilon": self.epsilon(st["history"]), "delta": s.delta, "accountant": cfg.accountant,
            **accountant_description(cfg.accountant, s.sampling),
            "noise_multiplier": s.z, "update_noise_multiplier": s.z_update,
            "sample_rate": s.q, "expected_clients_per_round": s.m,
            "rounds_accounted": sum(int(h[2]) for h in st["history"]), "adaptive": cfg.adaptive,
            "final_clip": st["clip"], "target_epsilon": cfg.target_epsilon, "stopped_early": stopped_early,
        }}
