"""Distance-based selection rules: Krum, Multi-Krum, MDA.

    Krum score:   s(i) = sum_{j in N_i} ||x_i - x_j||^2,  N_i = the n - f - 2 nearest other vectors
    krum:         x_{argmin_i s(i)}
    multi_krum:   (1/m) sum of the m vectors with the lowest scores        (default m = n - f)
    mda:          (1/(n-f)) sum_{i in S*} x_i,  S* = argmin_{|S| = n-f} max_{i,j in S} ||x_i - x_j||

Validity: Krum and Multi-Krum need n > 2f + 2 (Blanchard et al., NeurIPS'17, arXiv:1703.02757,
Prop. 1; ByzFL only checks n > 2f, which is looser than the theory). MDA needs n > 2f and
enumerates all C(n, f) subsets, so it refuses to run above `max_subsets` (default 20 000).
MDA: El Mhamdi, Guerraoui, Rouault, PODC'20, arXiv:2008.00742 (Minimum-Diameter Averaging).

Ties. Krum scores tie only on special inputs; the lowest row index wins. MDA's minimiser is
rarely unique: a diameter is one pair's distance, shared by every subset that keeps that pair
and drops farther points. The paper takes any minimiser; we take the one with the smallest
sum of squared pairwise distances, which is unique on generic inputs and so makes MDA
permutation invariant (the lowest subset in lexicographic order would not be).

>>> import torch
>>> x = torch.tensor([[0.], [1.], [2.], [3.], [100.]])
>>> krum(x, 1).tolist()  # N_i = 2 nearest; x_1 and x_2 tie, the lower index wins
[1.0]
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from fedlora.fl.aggregate.base import (
    HONEST_MAJORITY,
    KRUM_BOUND,
    RULE,
    Link,
    ensure,
    pairwise_distances,
    positive,
    register,
    stateless,
)


def krum_scores(x: Tensor, f: int) -> Tensor:
    """s(i): sum of squared distances from x_i to its n - f - 2 nearest other vectors."""
    n = x.shape[0]
    ensure("krum", n, f, KRUM_BOUND)
    d2 = pairwise_distances(x).square()
    d2.fill_diagonal_(float("inf"))  # a vector is not its own neighbour
    return torch.sort(d2, dim=1).values[:, : n - f - 2].sum(dim=1)


def _select_mean(x: Tensor, idx: Tensor) -> Tensor:
    return x.index_select(0, idx).mean(dim=0)


def multi_krum(x: Tensor, f: int, m: int | None = None) -> Tensor:
    """Average of the m vectors with the lowest Krum scores (m = n - f by default; m = 1 is Krum)."""
    n = x.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum needs 1 <= m <= n (m={m}, n={n}, f={f})")
    order = torch.sort(krum_scores(x, f), stable=True).indices
    return _select_mean(x, order[:m])


def krum(x: Tensor, f: int) -> Tensor:
    """The vector with the lowest Krum score."""
    return multi_krum(x, f, m=1)


def mda(x: Tensor, f: int, max_subsets: int = 20_000, chunk: int = 4096) -> Tensor:
    """Mean of the (n - f)-subset of smallest diameter, by exhaustive search over C(n, f) subsets."""
    n = x.shape[0]
    ensure("mda", n, f, HONEST_MAJORITY, _mda_cap(max_subsets))
    if f == 0:
        return x.mean(dim=0)
    dist = pairwise_distances(x)
    dist = torch.maximum(dist, dist.T)  # exactly symmetric, so equal diameters compare equal
    best, best_idx = None, None
    # Enumerate kept subsets `chunk` at a time, so memory stays O(chunk (n-f)^2) whatever C(n, f) is.
    combos = itertools.combinations(range(n), n - f)
    while batch := list(itertools.islice(combos, chunk)):
        idx = torch.tensor(batch, device=x.device)
        sub = dist[idx.unsqueeze(2), idx.unsqueeze(1)].flatten(1)
        diam, spread = sub.amax(dim=1), sub.square().sum(dim=1)
        # Lexicographic minimum of (diameter, sum of squared distances), see the module docstring.
        cand = torch.nonzero(diam == diam.min()).flatten()
        k = int(cand[torch.argmin(spread[cand])])
        key = (float(diam[k]), float(spread[k]))
        if best is None or key < best:
            best, best_idx = key, idx[k]
    return _select_mean(x, best_idx)


def _mda_cap(max_subsets: int):
    return (f"C(n, f) <= max_subsets={max_subsets}", lambda n, f: 0 <= f <= n and math.comb(n, f) <= max_subsets)


# ---------------------------------------------------------------- registration


@register("krum", RULE)
def _krum_link(f: int) -> Link:
    return Link("krum", RULE, f, stateless(lambda x: krum(x, f)), requires=(KRUM_BOUND,))


@register("multi_krum", RULE)
def _multi_krum_link(f: int, m: int | None = None) -> Link:
    reqs = (KRUM_BOUND,)
    if m is not None:
        positive("multi_krum", "m", m, integer=True)
        reqs += ((f"m <= n (m={m})", lambda n, f: m <= n),)
    return Link("multi_krum", RULE, f, stateless(lambda x: multi_krum(x, f, m)), requires=reqs, options={"m": m})


@register("mda", RULE)
def _mda_link(f: int, max_subsets: int = 20_000) -> Link:
    positive("mda", "max_subsets", max_subsets, integer=True)
    return Link(
        "mda",
        RULE,
        f,
        stateless(lambda x: mda(x, f, max_subsets)),
        requires=(HONEST_MAJORITY, _mda_cap(max_subsets)),
        options={"max_subsets": max_subsets},
    )
