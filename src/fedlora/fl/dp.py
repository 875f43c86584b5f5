"""User-level differential privacy: DP-FedAvg with fixed or adaptive clipping, and its accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, arXiv 1710.06963), server side, config `dp` (docs/privacy.md):

- What is clipped. Client i's update Delta_i = upload_i - download, every uploaded tensor flattened
  (sorted by name) into one vector, is clipped in L2 norm ("flat clipping"):
      Delta_i <- Delta_i * min(1, C / ||Delta_i||).
- What is sent. The method's usual upload (a real deployment clips on the client, or inside a
  trusted aggregator; the simulator clips what the server decodes, which gives the same sum).
- How it is combined. With m the number of clients sampled per round (fixed, as the engine
  samples exactly m of N uniformly without replacement) and uniform weights w_i = 1:
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

Accounting. One Poisson-subsampled Gaussian mechanism per round with noise multiplier z and rate
q = m / N, composed by opacus' RDPAccountant (or PRVAccountant); epsilon at delta (default
min(1e-5, N^-1.1), "delta below 1/N") is logged in every server row and in summary.json. The
engine samples a fixed-size subset rather than a Poisson one; the subsampling bound is exact for
q = 1 (every client every round, the default client_fraction) and the usual approximation
otherwise (as in Flower's DP wrappers). With `dp.target_epsilon` the run stops before a round
that would take epsilon past it.

State (RunState.dp, JSON-serializable): {"clip": current C, "history": [[z, q, rounds], ...]};
the accountant is rebuilt from the history. Noise comes from generators derived from
(seed, round, salt), so a run is reproducible and a resumed run draws the same noise.

>>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
>>> clip_rows_with_norms(x, 1.0)[0].tolist()       # [3, 4] / 5 and [0.3, 0.4] unchanged
[[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlora.config import ConfigError
from fedlora.fl.methods import ClientUpdate

if TYPE_CHECKING:
    from fedlora.fl.engine import RunState

log = logging.getLogger("fedlora")

MEAN_METHODS = "fedit, fedprox, ffa, fedsa, fedavgm, fedadagrad, fedadam, fedyogi"
_WHY_NOT = {
    "flora": "FLoRA stacks the clients' factors into a larger adapter instead of averaging them",
    "fedtree": "FedTreeLoRA averages within data-dependent clusters, whose choice DP-FedAvg does not cover",
    "local": "local training sends nothing to aggregate",
}
NOISE_SALT, COUNT_SALT = 3, 4  # RobustRound._generator salts 1 and 2 are the attack's and the chain's


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


# ---------------------------------------------------------------- accounting


def accountant(history: list, kind: str = "rdp"):
    """An opacus accountant holding `history` ([[noise_multiplier, sample_rate, steps], ...])."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return acc


def epsilon(history: list, delta: float, kind: str = "rdp") -> float:
    """epsilon at delta after `history`; inf when any step had no noise, 0 before any step."""
    if not history or all(int(n) == 0 for _, _, n in history):
        return 0.0
    if any(float(z) == 0 for z, _, _ in history):
        return math.inf
    with warnings.catch_warnings():  # opacus warns at the edges of its order grid and at q = 1
        warnings.simplefilter("ignore")
        return float(accountant(history, kind).get_epsilon(delta))


def with_step(history: list, z: float, q: float) -> list:
    """The history after one more round at (z, q) (a new list; consecutive equal steps merge)."""
    out = [list(h) for h in history]
    if out and out[-1][0] == z and out[-1][1] == q:
        out[-1][2] += 1
    else:
        out.append([z, q, 1])
    return out


def default_delta(num_clients: int) -> float:
    """min(1e-5, N^-1.1): delta well below 1/N, the population being protected."""
    return min(1e-5, num_clients ** -1.1)


# ---------------------------------------------------------------- inside the simulator


@dataclass(frozen=True)
class DPSetup:
    z: float             # noise multiplier the accountant sees
    z_update: float      # noise multiplier of the update (z, or z_update with adaptive clipping)
    count_std: float     # sigma_b (0 without adaptive clipping)
    m: int               # clients sampled per round: the fixed denominator
    q: float             # m / N
    delta: float


class DPRound:
    """Mixin of `Simulator` (through RobustRound): uses its `cfg`, `method`, `train_sets`,
    `num_sampled`, `_generator` and `_deltas`."""

    dp: DPSetup | None = None

    def _setup_dp(self) -> None:
        """Check the method and the settings against m and N; misuse fails here, before a round."""
        cfg, method = self.cfg.dp, self.method
        self.dp, self._dp_round = None, {}
        if not cfg.enabled:
            return
        if method.pooled or not method.mean_aggregation:
            why = ("it is a centralized reference" if method.pooled
                   else "it is decentralized: there is no server to add the noise" if getattr(
                       method, "decentralized", False)
                   else _WHY_NOT.get(method.name, "its server step does not start from a weighted mean of the uploads"))
            raise ConfigError(f"dp cannot apply to method {method.name!r}: {why}. "
                              f"DP-FedAvg needs a mean method ({MEAN_METHODS})")
        if self.cfg.robust.aggregator is not None:
            raise ConfigError("dp and robust.aggregator cannot be combined (see config.DPConfig)")
        if getattr(self.cfg.fl, "straggler_policy", "drop") == "stale":
            raise ConfigError("dp and fl.straggler_policy=stale cannot be combined: a late update could add a "
                              "second clipped update of one client to a round (see docs/privacy.md)")
        n, m = len(self.train_sets), self.num_sampled
        count_std = 0.0
        z_update = cfg.noise_multiplier
        if cfg.adaptive:
            count_std = m / 20 if cfg.count_noise is None else cfg.count_noise
            z_update = update_noise_multiplier(cfg.noise_multiplier, count_std)
        delta = default_delta(n) if cfg.delta is None else cfg.delta
        self.dp = DPSetup(cfg.noise_multiplier, z_update, count_std, m, m / n, delta)
        if cfg.target_epsilon is not None:
            first = self._dp_epsilon(with_step([], self.dp.z, self.dp.q))
            if first > cfg.target_epsilon:
                raise ConfigError(f"dp.target_epsilon={cfg.target_epsilon:g} is below the epsilon of a single "
                                  f"round ({first:.4g} at delta={delta:g}): raise it or dp.noise_multiplier")

    def _dp_state(self, state: RunState) -> dict:
        if state.dp is None:
            state.dp = {"clip": float(self.cfg.dp.clip), "history": []}
        return state.dp

    def _dp_epsilon(self, history: list) -> float:
        return epsilon(history, self.dp.delta, self.cfg.dp.accountant)

    def _dp_aggregate(self, state: RunState, updates: list[ClientUpdate], round_index: int) -> dict:
        """Clip each update, sum, add noise, divide by m; hand the method download + that mean."""
        dp, cfg, st = self.dp, self.cfg.dp, self._dp_state(state)
        ref, keys, deltas = self._deltas(state, updates, "differential privacy")
        x = torch.stack([torch.cat([d[k].to(torch.float64).reshape(-1) for k in keys]) for d in deltas])
        clip = st["clip"]
        noise_std = dp.z_update * clip if dp.z_update > 0 else 0.0  # z = 0 with C = inf: no noise, not NaN
        mean, norms = noised_mean(x, clip, noise_std, dp.m, self._generator(round_index, NOISE_SALT))
        self._dp_round = {"dp_clip": clip}
        if cfg.adaptive:
            fraction = unclipped_fraction(norms, clip, dp.count_std, dp.m, self._generator(round_index, COUNT_SALT))
            st["clip"] = next_clip(clip, fraction, cfg.target_quantile, cfg.clip_lr)
            self._dp_round["dp_unclipped_fraction"] = fraction  # the noised estimate, safe to publish
        st["history"] = with_step(st["history"], dp.z, dp.q)
        out, start = {}, 0
        for k in keys:
            size = ref[k].numel()
            out[k] = (ref[k].to(torch.float64) + mean[start:start + size].reshape(ref[k].shape)).to(torch.float32)
            start += size
        combined = ClientUpdate(-1, out, sum(u.num_examples for u in updates))
        return self.method.aggregate(state.server, [combined])

    def dp_metrics(self, state: RunState) -> dict:
        """The DP fields of this round's server row ({} without DP): epsilon spent so far at delta,
        the clip norm used and, with adaptive clipping, the noised unclipped fraction."""
        if self.dp is None:
            return {}
        st = self._dp_state(state)
        row = {"epsilon": self._dp_epsilon(st["history"]), "delta": self.dp.delta, **self._dp_round}
        self._dp_round = {}
        return row

    def _dp_stop(self, state: RunState) -> bool:
        """True when the next round would take epsilon past dp.target_epsilon (the run stops)."""
        target = self.cfg.dp.target_epsilon
        if self.dp is None or target is None:
            return False
        history = self._dp_state(state)["history"]
        after = self._dp_epsilon(with_step(history, self.dp.z, self.dp.q))
        if after > target:
            log.warning("dp: stopping after round %d of %d: one more round would take epsilon to %.4g > "
                        "dp.target_epsilon=%.4g", state.round, self.cfg.fl.rounds, after, target)
            return True
        return False

    def dp_summary(self, state: RunState) -> dict:
        """{"dp": {...}} for summary.json ({} without DP)."""
        if self.dp is None:
            return {}
        st, cfg = self._dp_state(state), self.cfg.dp
        return {"dp": {
            "epsilon": self._dp_epsilon(st["history"]), "delta": self.dp.delta, "accountant": cfg.accountant,
            "noise_multiplier": self.dp.z, "update_noise_multiplier": self.dp.z_update,
            "sample_rate": self.dp.q, "clients_per_round": self.dp.m,
            "rounds_accounted": sum(int(h[2]) for h in st["history"]), "adaptive": cfg.adaptive,
            "final_clip": st["clip"], "target_epsilon": cfg.target_epsilon,
            "stopped_early": state.round < self.cfg.fl.rounds,
        }}
