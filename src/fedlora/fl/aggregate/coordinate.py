"""Coordinate-wise rules: mean, median, trimmed mean, MeaMed.

Each treats the d coordinates independently; x is Tensor[n, d] and the result Tensor[d].

    mean:          (1/n) sum_i x_i               (or sum_i w_i x_i / sum_i w_i with weights)
    median:        [med]_k = median_i [x_i]_k    (midpoint of the two middle values for even n)
    trimmed_mean:  per coordinate, sort, drop the f smallest and f largest, average the n - 2f left
    meamed:        per coordinate, average the n - f values closest to the median

Validity: median, trimmed_mean and meamed need an honest majority, n > 2f. With f = 0,
trimmed_mean and meamed are the mean; the median is not.

References: Yin et al., ICML'18, arXiv:1803.01498 (median, trimmed mean);
Xie, Koyejo, Gupta 2018, arXiv:1802.10116 (MeaMed).

>>> import torch
>>> x = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 90.]])
>>> trimmed_mean(x, 1).tolist()
[4.0, 5.0, 6.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.fl.aggregate.base import HONEST_MAJORITY, RULE, Link, ensure, register, stateless


def mean(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Plain or example-weighted average (the only rule that uses weights)."""
    if weights is None:
        return x.mean(dim=0)
    w = weights.to(dtype=x.dtype, device=x.device)
    return (w.unsqueeze(1) * x).sum(dim=0) / w.sum()


def _sorted_median(s: Tensor) -> Tensor:
    """Median of values already sorted along dim 0 (midpoint for an even count)."""
    n = s.shape[0]
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def median(x: Tensor, f: int = 0) -> Tensor:
    """Coordinate-wise median. For even n, the midpoint of the two middle values (numpy's
    convention; torch.median returns the lower one, which is not symmetric under x -> -x)."""
    ensure("median", x.shape[0], f, HONEST_MAJORITY)
    return _sorted_median(torch.sort(x, dim=0).values)


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    """Coordinate-wise trimmed mean: drop the f smallest and f largest values, average the rest."""
    n = x.shape[0]
    ensure("trimmed_mean", n, f, HONEST_MAJORITY)
    return torch.sort(x, dim=0).values[f : n - f].mean(dim=0)


def meamed(x: Tensor, f: int) -> Tensor:
    """Mean around the median: per coordinate, the average of the n - f values closest to it."""
    n = x.shape[0]
    ensure("meamed", n, f, HONEST_MAJORITY)
    med = median(x, f)
    # Ties at the boundary are broken by sort order, which is stable: the lower row index wins.
    idx = torch.sort((x - med).abs(), dim=0, stable=True).indices[: n - f]
    return torch.gather(x, 0, idx).mean(dim=0)


# ---------------------------------------------------------------- registration


@register("mean", RULE)
def _mean_link(f: int) -> Link:
    def apply(x, state, generator=None, weights=None):
        return mean(x, weights), state

    # f is accepted (chains share one f) but mean tolerates no Byzantine client at all.
    return Link("mean", RULE, f, apply)


@register("median", RULE)
def _median_link(f: int) -> Link:
    return Link("median", RULE, f, stateless(lambda x: median(x, f)), requires=(HONEST_MAJORITY,))


@register("trimmed_mean", RULE)
def _trimmed_mean_link(f: int) -> Link:
    return Link("trimmed_mean", RULE, f, stateless(lambda x: trimmed_mean(x, f)), requires=(HONEST_MAJORITY,))


@register("meamed", RULE)
def _meamed_link(f: int) -> Link:
    return Link("meamed", RULE, f, stateless(lambda x: meamed(x, f)), requires=(HONEST_MAJORITY,))
