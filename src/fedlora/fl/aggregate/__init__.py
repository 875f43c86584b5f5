"""Byzantine-robust aggregation of flattened client updates: rules, pre-aggregators, chains.

A *rule* maps x: Tensor[n, d] (one row per client) to one vector Tensor[d]; a *pre-aggregator*
maps it to Tensor[n', d]. A chain is pre-aggregators followed by one rule, all sharing f, the
number of Byzantine clients tolerated:

>>> import torch
>>> chain = build_chain(["arc", "nnm", "trimmed_mean"], f=1)
>>> chain.validate(5)
>>> x = torch.tensor([[0.], [1.], [2.], [3.], [1e6]])
>>> v, state = chain(x, chain.init(1))
>>> bool(v.abs() < 4)
True

Rules: mean, median, trimmed_mean, meamed (coordinate.py); krum, multi_krum, mda (distance.py);
geometric_median, centered_clipping (geometric.py). Pre-aggregators: nnm, bucketing, clip, arc
(preagg.py). `available()` lists them; docs/robust_aggregation.md has the table of conditions.

Weights. Only `mean` uses the example-count weights (sum_i w_i x_i / sum_i w_i, FedAvg); every
robust rule and pre-aggregator ignores them and counts each client once. The counts are
self-reported, so they are an attack surface: one Byzantine client claiming 1e9 examples would
own a weighted median or a weighted Krum outright, and the guarantees these rules carry
(breakdown point 1/2, n > 2f + 2 for Krum, (f, kappa)-robustness) are stated for n identities
with equal say, not for weight mass an attacker controls. Aggregating one vote per client
keeps those guarantees; weighting honest heterogeneity is then the job of the honest clients'
own updates, not of the server.
"""

from fedlora.fl.aggregate.base import PRE, RULE, Link, State, available, build_link, register
from fedlora.fl.aggregate.chain import Chain, aggregate_tensors, build_chain
from fedlora.fl.aggregate.coordinate import meamed, mean, median, trimmed_mean
from fedlora.fl.aggregate.distance import krum, krum_scores, mda, multi_krum
from fedlora.fl.aggregate.geometric import centered_clipping, geometric_median
from fedlora.fl.aggregate.preagg import arc, arc_k, bucketing, clip, nnm

__all__ = [
    "PRE", "RULE", "Chain", "Link", "State", "aggregate_tensors", "arc", "arc_k", "available", "bucketing",
    "build_chain", "build_link", "centered_clipping", "clip", "geometric_median", "krum", "krum_scores", "mda",
    "meamed", "mean", "median", "multi_krum", "nnm", "register", "trimmed_mean",
]
