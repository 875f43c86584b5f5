"""Privacy accounting for DP-FedAvg: the one place epsilon is computed (docs/privacy.md).

A run's history is [[z, q, rounds], ...]: each round released one Gaussian mechanism with noise
std z C on the sum of the sampled clients' clipped updates (||Delta_i|| <= C), the clients drawn by
the run's sampler at rate q. What epsilon means depends on that sampler:

- sampling='poisson': each client joins a round independently with probability q. Adjacency: add
  or remove one client. Adding or removing one clipped update moves the sum by at most C, so the
  Gaussian's noise multiplier is z. Accountant: opacus RDPAccountant ('rdp', the Poisson-subsampled
  Gaussian of Mironov, Talwar, Zhang 2019, arXiv 1908.10530) or PRVAccountant ('prv', Gopi, Lee,
  Wutschitz 2021, arXiv 2106.02848).
- sampling='fixed': exactly m = round(q N) of the N = `population` clients, uniformly without
  replacement. The sample size is fixed, so N is public and the adjacency is replace one client
  (add/remove would change N and m); accountant: dp_accounting's RdpAccountant with
  NeighboringRelation.REPLACE_ONE and SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z/2)),
  the bound of Wang, Balle, Kasiviswanathan, "Subsampled Renyi Differential Privacy and Analytical
  Moments Accountant", AISTATS 2019, arXiv 1808.00087 (Theorem 9, with Theorem 27 for the
  Gaussian). Only 'rdp' exists for this sampler.

Why z/2 there. WBK19's Theorem 9 bounds the subsampled mechanism from the RDP eps(alpha) of the
base mechanism (the noised sum over the m sampled clients) under the SAME replace-one relation; for
the Gaussian, eps(alpha) = alpha / (2 sigma^2) with sigma = noise std / replace-one L2 sensitivity.
dp_accounting does exactly that and doubles nothing: _compute_rdp_sample_wor_gaussian (in
rdp/rdp_privacy_accountant.py) takes "the ratio of the standard deviation of the Gaussian noise to
the l2-sensitivity of the function" and uses alpha / (2 sigma^2) as is (so does its plain
GaussianDpEvent under REPLACE_ONE; autodp, where that code comes from, takes sigma the same way;
only its PLD accountant builds the +-sensitivity shift of replacement in). Replacing client i's
Delta_i by Delta_i' moves the sum by ||Delta_i - Delta_i'|| <= 2C: sigma = z C / (2C) = z / 2.
With z as is, q = 0.1, z = 1, 1000 rounds gives 63.1, below a lower bound on the true epsilon
(over 120: "all N clients send +C e" vs "one of them sends -C e" makes each round N(0, 1) vs
(1-q) N(0, 1) + q N(-2/z, 1), the Poisson add/remove pair at multiplier z/2; tested); z/2 gives
748. The two samplers' epsilons are for different relations (replacing is removing then adding:
group privacy turns an add/remove eps into a replace-one 2 eps), so compare them with care.

q = 1 (every client every round): no subsampling event; the plain composed Gaussian with
multiplier z (poisson) or z/2 (fixed). z = 0 in a round gives inf; no rounds gives 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from functools import lru_cache
from importlib.metadata import version

from fedlora.config import ConfigError

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "prv")


def _check(accountant: str, sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown client sampling {sampling!r} (fl.sampling): use 'poisson' or 'fixed'")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown privacy accountant {accountant!r} (dp.accountant): use 'rdp' or 'prv'")
    if sampling == "fixed" and accountant != "rdp":
        raise ConfigError(f"dp.accountant={accountant!r} accounts only Poisson sampling; with fl.sampling=fixed "
                          "(m of N without replacement) set dp.accountant: rdp, or set fl.sampling: poisson")


def accountant_description(accountant: str = "rdp", sampling: str = "poisson") -> dict:
    """What the run's privacy report states: sampler, adjacency, sensitivity, library and method."""
    _check(accountant, sampling)
    if sampling == "poisson":
        method = {"rdp": "RDP of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019)",
                  "prv": "privacy random variables (Gopi, Lee, Wutschitz 2021)"}[accountant]
        return {"sampling": "poisson", "sampler": "each client joins a round independently with probability q",
                "adjacency": "add/remove one client", "sensitivity": "C", "noise_multiplier": "z",
                "accountant": f"opacus {accountant.upper()}", "library": f"opacus {version('opacus')}",
                "method": method}
    return {"sampling": "fixed", "sampler": "exactly m = round(q N) of N clients, uniformly without replacement",
            "adjacency": "replace one client", "sensitivity": "2C", "noise_multiplier": "z / 2",
            "accountant": "dp_accounting RDP", "library": f"dp-accounting {version('dp-accounting')}",
            "method": "RDP of the Gaussian subsampled without replacement (Wang, Balle, Kasiviswanathan "
                      "2019, Theorem 27), NeighboringRelation.REPLACE_ONE"}


class _DropUnconverged(logging.Filter):
    """absl's '_compute_log_a_frac failed to converge' (that order is dropped, harmlessly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def quiet_dp_accounting():
    """Drop dp_accounting's harmless non-convergence warnings (only those) while computing."""
    absl_log, flt = logging.getLogger("absl"), _DropUnconverged()
    absl_log.addFilter(flt)
    try:
        yield
    finally:
        absl_log.removeFilter(flt)


def _segments(history: list) -> list[tuple[float, float, int]]:
    out = [(float(z), float(q), int(n)) for z, q, n in history]
    for z, q, n in out:
        if z < 0 or not 0 <= q <= 1 or n < 0:
            raise ValueError(f"bad privacy history step [z={z:g}, q={q:g}, rounds={n}]")
    return [s for s in out if s[2] > 0]


def _sample_size(q: float, population: int) -> int:
    m = round(q * population)
    if abs(q * population - m) > 1e-6:
        raise ValueError(f"fixed sampling records q = m / N: q={q!r} with N={population} "
                         f"is not (q*N={q * population:g})")
    return m


@lru_cache(maxsize=256)
def _fixed_step_rdp(z: float, population: int, m: int) -> tuple:
    """(orders, RDP of one round) under replace-one: a pure function, cached (the WOR bound is slow)."""
    import dp_accounting as dpa

    gauss = dpa.GaussianDpEvent(z / 2)  # replace-one sensitivity 2C (module docstring)
    event = gauss if m == population else dpa.SampledWithoutReplacementDpEvent(population, m, gauss)
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    with quiet_dp_accounting():
        acc.compose(event)
    return tuple(acc.orders.tolist()), tuple(acc.rdp.tolist())


def _fixed_epsilon(segments: list, delta: float, population: int) -> float:
    import numpy as np
    from dp_accounting.rdp import compute_epsilon

    total, orders = 0.0, None
    for z, q, n in segments:
        orders, rdp = _fixed_step_rdp(z, population, _sample_size(q, population))
        total = total + n * np.asarray(rdp)
    with quiet_dp_accounting():
        return float(compute_epsilon(orders, total, delta)[0])


@lru_cache(maxsize=256)
def _poisson_step_rdp(z: float, q: float) -> tuple:
    """RDP of one Poisson round at opacus' default orders (what RDPAccountant sums), cached."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return tuple(analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


@lru_cache(maxsize=64)
def _prv_epsilon(segments: tuple, delta: float) -> float:
    """opacus PRVAccountant (about 1 s): cached on the whole history, as a run asks for the same one
    twice (before a round, whether to stop; after it, what was spent)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(segments)
    return float(acc.get_epsilon(delta))


def _poisson_epsilon(segments: list, delta: float, accountant: str) -> float:
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    with warnings.catch_warnings():  # opacus warns at the edges of its order grid and at q = 1
        warnings.simplefilter("ignore")
        if accountant == "prv":
            return _prv_epsilon(tuple(segments), delta)
        total = sum(n * np.asarray(_poisson_step_rdp(z, q)) for z, q, n in segments)
        return float(analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)[0])


def epsilon(history: list, delta: float, accountant: str = "rdp", sampling: str = "poisson",
            population: int | None = None) -> float:
    """epsilon at delta after `history` ([[z, q, rounds], ...]) under `sampling`'s adjacency.

    `population` (N, the number of clients) is needed for sampling='fixed'. inf when a round had
    no noise (z = 0), 0.0 before any round.
    """
    _check(accountant, sampling)
    if sampling == "fixed" and (population is None or int(population) < 1):
        raise ConfigError("fl.sampling=fixed needs the population: pass population=N (the number of clients) "
                          "to the accountant")
    segments = _segments(history)
    if not segments:
        return 0.0
    if any(z == 0 for z, _, _ in segments):
        return math.inf
    if sampling == "fixed":
        return _fixed_epsilon(segments, delta, int(population))
    return _poisson_epsilon(segments, delta, accountant)


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
