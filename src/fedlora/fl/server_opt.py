"""Server optimizers on the aggregated pseudo-gradient (Reddi et al., arXiv 2003.00295; Hsu et al., arXiv 1909.06335).

The server treats one round's averaged client change as a gradient step and feeds it to an
optimizer of its own:

    Delta_t = sum_i p_i x_i - x_t                      (pseudo-gradient; x_i = client i's trained adapter)
    FedAvgM:    m = beta1 m + Delta                    x += server_lr * m
    FedAdagrad: m = beta1 m + (1 - beta1) Delta ;  v = v + Delta^2
    FedAdam:    m = beta1 m + (1 - beta1) Delta ;  v = beta2 v + (1 - beta2) Delta^2
    FedYogi:    m = beta1 m + (1 - beta1) Delta ;  v = v - (1 - beta2) Delta^2 sign(v - Delta^2)
    adaptive:   x += server_lr * m / (sqrt(v) + tau)

All element-wise, with no bias correction (the paper's Algorithm 2 has none). FedAvgM with
beta1 = 0 and server_lr = 1 is plain FedAvg: x + (mean - x) = mean.

Optax-style: a rule is a pair of pure functions, `init(params) -> state` and
`update(delta, state) -> (step, state)`; the state is a flat `{name: tensor}` dict ('m.<param>',
'v.<param>') that is returned, never mutated, so it checkpoints like any other tensors.

>>> import torch
>>> opt = fedavgm(server_lr=1.0, beta1=0.5)
>>> state = opt.init({"w": torch.zeros(1)})
>>> step, state = opt.update({"w": torch.ones(1)}, state)
>>> step, state = opt.update({"w": torch.ones(1)}, state)
>>> step["w"].item()  # m = 0.5 * 1 + 1
1.5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizer:
    """`init(params) -> state`; `update(delta, state) -> (step, new_state)`; apply with `apply_step`."""

    init: Callable[[TensorDict], TensorDict]
    update: Callable[[TensorDict, TensorDict], tuple[TensorDict, TensorDict]]


def pseudo_gradient(mean: TensorDict, params: TensorDict) -> TensorDict:
    """Delta = mean - params, in float64 (exact for float32 inputs of similar magnitude)."""
    return {k: mean[k].to(torch.float64) - params[k].to(torch.float64) for k in params}


def apply_step(params: TensorDict, step: TensorDict) -> TensorDict:
    """params + step, computed in float64 and returned in each parameter's own dtype."""
    return {k: (p.to(torch.float64) + step[k].to(torch.float64)).to(p.dtype) for k, p in params.items()}


def _check(server_lr: float, beta1: float, beta2: float | None = None, tau: float | None = None) -> None:
    if not server_lr > 0:
        raise ValueError(f"server_lr must be > 0, got {server_lr}")
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
    if beta2 is not None and not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    if tau is not None and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _zeros(params: TensorDict, prefix: str, fill: float = 0.0) -> TensorDict:
    return {f"{prefix}.{k}": torch.full_like(p, fill) for k, p in params.items()}


def fedavgm(server_lr: float = 1.0, beta1: float = 0.9) -> ServerOptimizer:
    """Server momentum: m = beta1 m + Delta; step = server_lr * m (m starts at 0)."""
    _check(server_lr, beta1)

    def update(delta: TensorDict, state: TensorDict) -> tuple[TensorDict, TensorDict]:
        m = {k: beta1 * state[f"m.{k}"] + d for k, d in delta.items()}
        return {k: server_lr * mk for k, mk in m.items()}, {f"m.{k}": mk for k, mk in m.items()}

    return ServerOptimizer(lambda params: _zeros(params, "m"), update)


def _adaptive(second_moment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              server_lr: float, beta1: float, tau: float, v0: float | None) -> ServerOptimizer:
    """The shared shape of FedAdagrad/FedAdam/FedYogi; only the v update differs.

    v starts at v0 = tau^2 unless given (the paper's Algorithm 2 asks v_{-1} >= tau^2); m at 0.
    """
    v0 = tau**2 if v0 is None else float(v0)
    if v0 < 0:
        raise ValueError(f"v0 must be >= 0, got {v0}")

    def init(params: TensorDict) -> TensorDict:
        return {**_zeros(params, "m"), **_zeros(params, "v", v0)}

    def update(delta: TensorDict, state: TensorDict) -> tuple[TensorDict, TensorDict]:
        new, step = {}, {}
        for k, d in delta.items():
            m = beta1 * state[f"m.{k}"] + (1 - beta1) * d
            v = second_moment(state[f"v.{k}"], d * d)
            new[f"m.{k}"], new[f"v.{k}"] = m, v
            step[k] = server_lr * m / (v.sqrt() + tau)
        return step, new

    return ServerOptimizer(init, update)


def fedadagrad(server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3,
               v0: float | None = None) -> ServerOptimizer:
    """v = v + Delta^2."""
    _check(server_lr, beta1, tau=tau)
    return _adaptive(lambda v, d2: v + d2, server_lr, beta1, tau, v0)


def fedadam(server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
            v0: float | None = None) -> ServerOptimizer:
    """v = beta2 v + (1 - beta2) Delta^2."""
    _check(server_lr, beta1, beta2, tau)
    return _adaptive(lambda v, d2: beta2 * v + (1 - beta2) * d2, server_lr, beta1, tau, v0)


def fedyogi(server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
            v0: float | None = None) -> ServerOptimizer:
    """v = v - (1 - beta2) Delta^2 sign(v - Delta^2): v moves toward Delta^2 by an additive step."""
    _check(server_lr, beta1, beta2, tau)
    return _adaptive(lambda v, d2: v - (1 - beta2) * d2 * torch.sign(v - d2), server_lr, beta1, tau, v0)


RULES: dict[str, Callable[..., ServerOptimizer]] = {
    "fedavgm": fedavgm, "fedadagrad": fedadagrad, "fedadam": fedadam, "fedyogi": fedyogi,
}
