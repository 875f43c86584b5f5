"""Worker (local) momentum: each client sends an exponential average of its local updates.

    m_t = beta * m_(t-1) + (1 - beta) * g_t,        sent_t = m_t

where g_t = trained - start is the client's local update in round t (the "gradient" of
Byzantine-robust distributed SGD, arXiv 2604.10179, section 4 of our methods notes; the same rule
as ByzFL's `momentum_gradient.mul_(beta).add_(g, alpha=1 - beta)`). Averaging over rounds shrinks
the stochastic-noise part of the honest spread, which is what a robust aggregator's error scales
with, so robust rules need worker momentum to reach the lower error floor (the kappa*G^2
heterogeneity floor stays).

The paper is silent on two details; both are options of `momentum_update`, and the defaults are
ByzFL's (its clients start from a zero buffer and send m_t as it is):
- `init="zero"` (default): m_0 = 0, so m_1 = (1 - beta) g_1; `init="first"`: m_1 = g_1.
- `bias_correction=False` (default); True sends m_t / (1 - beta^t) as Adam does, which undoes the
  zero start (at t = 1 it sends g_1). It is meaningless with `init="first"` and is refused there.

State is explicit and flat, so it checkpoints like any payload: one float tensor per update name
plus the round counter under `"__step__"`. Functions return new state and never mutate their
inputs. Buffers are kept in at least float32 so bf16 updates do not lose the average to rounding.

    >>> state = momentum_init({"w": torch.zeros(2)})
    >>> sent, state = momentum_update(state, {"w": torch.tensor([1.0, 2.0])}, beta=0.5)
    >>> sent["w"].tolist()
    [0.5, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

STEP_KEY = "__step__"
INITS = ("zero", "first")


def momentum_init(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero momentum buffers shaped like `tensors` (the update's names), and step 0."""
    if STEP_KEY in tensors:
        raise ValueError(f"{STEP_KEY!r} is reserved for the momentum step counter")
    state = {
        name: torch.zeros(t.shape, dtype=_buffer_dtype(t.dtype), device=t.device) for name, t in tensors.items()
    }
    state[STEP_KEY] = torch.zeros((), dtype=torch.int64)
    return state


def momentum_update(
    state: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    beta: float,
    *,
    init: str = "zero",
    bias_correction: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round: returns (what the client sends, in the update's dtypes; the new state)."""
    _check(state, update, beta, init, bias_correction)
    step = int(state[STEP_KEY]) + 1
    new: dict[str, torch.Tensor] = {STEP_KEY: torch.tensor(step, dtype=torch.int64)}
    sent: dict[str, torch.Tensor] = {}
    for name, g in update.items():
        m, g32 = state[name], g.detach().to(state[name].dtype)
        new[name] = g32.clone() if (init == "first" and step == 1) else m * beta + g32 * (1 - beta)
        out = new[name] / (1 - beta**step) if bias_correction else new[name]
        sent[name] = out.to(g.dtype)
    return sent, new


def _buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"momentum needs floating tensors, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def _check(state, update, beta, init, bias_correction) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "first" and bias_correction:
        raise ValueError("bias_correction undoes the zero start; it cannot be combined with init='first'")
    if STEP_KEY not in state:
        raise ValueError(f"momentum state lacks {STEP_KEY!r}; build it with momentum_init")
    names = set(state) - {STEP_KEY}
    if set(update) != names:
        raise ValueError(
            f"update names do not match the momentum state: missing {sorted(names - set(update))[:3]}, "
            f"unexpected {sorted(set(update) - names)[:3]}"
        )
    for name, g in update.items():
        if tuple(g.shape) != tuple(state[name].shape):
            raise ValueError(f"{name}: update shape {tuple(g.shape)}, momentum shape {tuple(state[name].shape)}")
        if not g.is_floating_point():
            raise ValueError(f"{name}: momentum needs a floating update, got {g.dtype}")
