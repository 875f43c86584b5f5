"""Geometric median (smoothed Weiszfeld) and centered clipping (with history state).

    geometric_median:  z* = argmin_z sum_i ||z - x_i||,  by smoothed Weiszfeld iterations
                       beta_i = 1 / max(eps, ||x_i - z||),  z <- sum_i beta_i x_i / sum_i beta_i
    centered_clipping: v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||),  L times;
                       v starts from the previous round's output (the "history")

Validity: both need n > 2f (breakdown point 1/2 for the geometric median; centered clipping's
guarantee needs a small Byzantine fraction, and n > 2f is the hard floor we enforce).

Defaults and why:
- geometric_median starts from the coordinate-wise median (robust and scale-free; ByzFL starts
  from 0 and stops after T=3 steps, which is far from the minimiser, e.g. 3.79 instead of 4 on
  its own 3x3 example) and iterates up to `iterations=100` times until a step is shorter than
  `tol=1e-6` times the mean distance to the points. `eps=1e-8` is absolute: keep it far below typical distances,
  otherwise every weight is 1/eps and the rule degrades to the mean (ByzFL's eps=0.1 does exactly
  that on small LoRA updates).
- centered_clipping uses tau=100, L=1 (Karimireddy et al. and ByzFL). tau is absolute: it should
  be of the order of the honest spread ||x_i - mean||, not of ||x_i||; tau=100 on LoRA updates of
  norm 1e-2 is the mean. The paper's v0 is the previous aggregate; in the first round there is
  none, and `first_round="median"` (default) starts from the coordinate-wise median instead of
  0, so the first round is not stuck within L*tau of the origin. `first_round="zeros"` is ByzFL's.

References: Weiszfeld 1937; Pillutla, Kakade, Harchaoui, RFA, arXiv:1912.13445 (smoothing);
Karimireddy, He, Jaggi, "Learning from History", ICML'21, arXiv:2012.10333.

>>> import torch
>>> x = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [50., 50.]], dtype=torch.float64)
>>> z = geometric_median(x, f=1)
>>> bool(z.norm() < 1)
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.fl.aggregate.base import HONEST_MAJORITY, RULE, Link, State, clip_rows, ensure, positive, register, row_norms
from fedlora.fl.aggregate.coordinate import median


def geometric_median(x: Tensor, f: int = 0, eps: float = 1e-8, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Smoothed Weiszfeld from the coordinate-wise median; stops when a step is shorter than
    tol times the mean distance to the points (scale-free; the objective itself is too flat
    near the minimiser to be a good stopping signal)."""
    ensure("geometric_median", x.shape[0], f, HONEST_MAJORITY)
    z = median(x, f)
    for _ in range(iterations):
        beta = 1.0 / torch.clamp(row_norms(x - z), min=eps)
        new = (beta.unsqueeze(1) * x).sum(dim=0) / beta.sum()
        step, z = torch.linalg.vector_norm(new - z), new
        if not bool(step > tol * row_norms(x - z).mean()):
            break
    return z


def centered_clipping(x: Tensor, v: Tensor, tau: float = 100.0, iterations: int = 1) -> Tensor:
    """L steps of v <- v + mean_i clip(x_i - v, tau) from the centre v."""
    for _ in range(iterations):
        v = v + clip_rows(x - v, tau).mean(dim=0)
    return v


# ---------------------------------------------------------------- registration


@register("geometric_median", RULE)
def _geometric_median_link(f: int, eps: float = 1e-8, iterations: int = 100, tol: float = 1e-6) -> Link:
    positive("geometric_median", "eps", eps)
    positive("geometric_median", "iterations", iterations, integer=True)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"geometric_median: tol must be a number >= 0, got {tol!r}")

    def apply(x, state, generator=None, weights=None):
        return geometric_median(x, f, eps, iterations, tol), state

    return Link(
        "geometric_median", RULE, f, apply, requires=(HONEST_MAJORITY,),
        options={"eps": eps, "iterations": iterations, "tol": tol},
    )


@register("centered_clipping", RULE)
def _centered_clipping_link(f: int, tau: float = 100.0, iterations: int = 1, first_round: str = "median") -> Link:
    positive("centered_clipping", "tau", tau)
    positive("centered_clipping", "iterations", iterations, integer=True)
    if first_round not in ("median", "zeros"):
        raise ValueError(f"centered_clipping: first_round must be 'median' or 'zeros', got {first_round!r}")

    def init(d: int, dtype: torch.dtype, device: torch.device | None) -> State:
        return {"v": torch.zeros(d, dtype=dtype, device=device), "rounds": torch.zeros((), dtype=torch.int64)}

    def apply(x, state, generator=None, weights=None):
        n, d = x.shape
        state = state or init(d, x.dtype, x.device)
        if state["v"].shape != (d,):
            raise ValueError(f"centered_clipping: state v has shape {tuple(state['v'].shape)}, inputs have d={d}")
        rounds = int(state["rounds"])
        v = median(x, f) if rounds == 0 and first_round == "median" else state["v"].to(device=x.device, dtype=x.dtype)
        v = centered_clipping(x, v, tau, iterations)
        return v, {"v": v.clone(), "rounds": torch.tensor(rounds + 1, dtype=torch.int64)}

    return Link(
        "centered_clipping", RULE, f, apply, requires=(HONEST_MAJORITY,), init=init,
        options={"tau": tau, "iterations": iterations, "first_round": first_round},
    )
