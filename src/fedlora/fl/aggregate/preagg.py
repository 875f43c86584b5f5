"""Pre-aggregators (n vectors -> n' vectors): NNM, bucketing, static clipping, ARC.

    nnm:        x_i <- (1/(n-f)) sum_{j in N_i} x_j,  N_i = the n - f nearest neighbours of x_i
                (x_i itself included, at distance 0)                                     n' = n
    bucketing:  random permutation pi (from the generator passed in), then the mean of each
                consecutive bucket of s vectors; the last bucket may be smaller      n' = ceil(n/s)
    clip:       x_i <- min(1, c / ||x_i||) x_i                                            n' = n
    arc:        k = floor(2 (f/n) (n - f)); C = the (k+1)-th largest norm; x_i <- min(1, C/||x_i||) x_i
                i.e. the k largest vectors are clipped to the norm of the next one      n' = n

Validity: nnm and arc need n > 2f. Bucketing needs a seeded torch.Generator at call time
(randomness is passed in, never global). After bucketing, the next link is validated with
n' = ceil(n/s) and the same f: f Byzantine vectors can spoil at most f buckets.

ARC: robustness.md phrases it "clip to the norm of the k-th largest"; the paper's Algorithm 1
and ByzFL (byzfl/aggregators/preaggregators.py, ARC) clip the k largest to the norm of the
(k+1)-th largest, which is what we do (with f = 0, k = 0 and nothing is clipped). k is computed
in integers, 2 f (n - f) // n, so no float rounding can move it.

References: Allouah et al., "Fixing by Mixing", AISTATS'23, arXiv:2302.01772 (NNM);
Karimireddy, He, Jaggi, ICLR'22, arXiv:2006.09365 (bucketing); Allouah et al. 2024,
arXiv:2405.14432 (ARC).

>>> import torch
>>> x = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])
>>> nnm(x, 1).tolist()
[[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.fl.aggregate.base import (
    HONEST_MAJORITY,
    PRE,
    Link,
    clip_rows,
    ensure,
    pairwise_distances,
    positive,
    register,
    row_norms,
    stateless,
)


def nnm(x: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing: each vector becomes the mean of its n - f nearest neighbours."""
    n = x.shape[0]
    ensure("nnm", n, f, HONEST_MAJORITY)
    idx = torch.sort(pairwise_distances(x), dim=1, stable=True).indices[:, : n - f]
    # A mixing matrix keeps memory at O(n d) instead of gathering n (n - f) rows.
    mix = torch.zeros(n, n, dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0 / (n - f))
    return mix @ x


def bucketing(x: Tensor, s: int, generator: torch.Generator) -> Tensor:
    """Means of consecutive buckets of size s after a random permutation."""
    if not isinstance(generator, torch.Generator):
        raise ValueError("bucketing needs a seeded torch.Generator (pass generator=...)")
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    bucket = torch.arange(n, device=x.device) // s  # bucket of each permuted position
    mix = torch.zeros(math.ceil(n / s), n, dtype=x.dtype, device=x.device)
    mix[bucket, perm] = 1.0
    return (mix @ x) / mix.sum(dim=1, keepdim=True)


def clip(x: Tensor, threshold: float) -> Tensor:
    """Static clipping of every vector to L2 norm `threshold`."""
    return clip_rows(x, threshold)


def arc_k(n: int, f: int) -> int:
    """Number of vectors ARC clips: floor(2 (f/n) (n - f))."""
    return (2 * f * (n - f)) // n


def arc(x: Tensor, f: int) -> Tensor:
    """Adaptive robust clipping: clip the k largest vectors to the norm of the (k+1)-th largest."""
    n = x.shape[0]
    ensure("arc", n, f, HONEST_MAJORITY)
    k = arc_k(n, f)
    if k == 0:
        return x
    threshold = torch.sort(row_norms(x), descending=True).values[k]
    return clip_rows(x, threshold)


# ---------------------------------------------------------------- registration


@register("nnm", PRE)
def _nnm_link(f: int) -> Link:
    return Link("nnm", PRE, f, stateless(lambda x: nnm(x, f)), requires=(HONEST_MAJORITY,))


@register("bucketing", PRE)
def _bucketing_link(f: int, s: int = 2) -> Link:  # s = 2: the paper's usual choice (ByzFL's s = 1 is a no-op)
    positive("bucketing", "s", s, integer=True)

    def apply(x, state, generator=None, weights=None):
        return bucketing(x, s, generator), state

    return Link(
        "bucketing", PRE, f, apply, rows_out=lambda n: math.ceil(n / s), needs_generator=True, options={"s": s}
    )


@register("clip", PRE)
def _clip_link(f: int, threshold: float) -> Link:  # no default: the scale is the user's
    positive("clip", "threshold", threshold)
    return Link("clip", PRE, f, stateless(lambda x: clip(x, threshold)), options={"threshold": threshold})


@register("arc", PRE)
def _arc_link(f: int) -> Link:
    return Link("arc", PRE, f, stateless(lambda x: arc(x, f)), requires=(HONEST_MAJORITY,))
