"""Byzantine attacks for simulation: omniscient update attacks, label flipping, malformed payloads.

An update attack maps the honest clients' flattened updates `honest: [h, d]` to the vectors the
`f` Byzantine clients send, `[f, d]`. Attacks are omniscient (they see every honest vector) and,
for the `optimal_*` variants, defence-aware (they call the server's aggregation rule). Definitions
follow ByzFL (LPD-EPFL/byzfl, `byzfl/attacks/attacks.py`) except where a docstring says otherwise:

    sign_flip      -scale * mean(honest)                         Allen-Zhu et al., ICLR'20
    ipm            -tau * mean(honest), tau=0.1                  Xie, Koyejo, Gupta, UAI'19
    alie           mean(honest) - z * std(honest), per coord.    Baruch et al., NeurIPS'19
    gaussian       N(mu, sigma^2) i.i.d., fresh per Byzantine     -
    mimic          honest[worker]                                Karimireddy et al., ICLR'22
    inf            +inf everywhere (to test the NaN/Inf policy)  -
    optimal_ipm    ipm with tau maximizing the damage  } objective: ||aggregate([honest; byz]) -
    optimal_alie   alie with z maximizing the damage   }            mean(honest)||_2

All Byzantine rows are identical except for `gaussian`. Computation runs in at least float32 and
the result is cast back to `honest.dtype`. Example::

    >>> x = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])
    >>> attack("sign_flip", x, 2, torch.Generator()).tolist()
    [[-4.0, -5.0, -6.0], [-4.0, -5.0, -6.0]]
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlora.fl.payload import encode

Aggregate = Callable[[torch.Tensor], torch.Tensor]

# tau (or z) values tried by the optimal attacks before the golden-section refinement. They span
# Xie et al.'s small/large IPM regimes (0.1, 100), ByzFL's defaults (IPM 2.0, ALIE 1.5) and
# Baruch's z (about 0.2-1.5 for 10-100 clients).
DEFAULT_GRID: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
DEFAULT_REFINE = 12


# --- update attacks ------------------------------------------------------------------------------


def baruch_z(num_clients: int, num_byzantine: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f workers must be 'seduced', z = Phi^-1((n - s)/n).

    >>> round(baruch_z(50, 12), 4)   # s = 14, Phi^-1(0.72)
    0.5828
    """
    n, f = num_clients, num_byzantine
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"Baruch's z is undefined for n={n}, f={f} (needs 0 < (n - s)/n < 1, s={s})")
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=0)


def _sign_flip(x, f, gen, agg, *, scale):
    return -scale * _mean(x)


def _ipm(x, f, gen, agg, *, tau):
    return -tau * _mean(x)


def _alie(x, f, gen, agg, *, z):
    if z is None:
        z = baruch_z(x.shape[0] + f, f)
    # Sample std (ddof=1) as ByzFL; one honest client has no spread, so its std is 0.
    std = x.std(dim=0, correction=1) if x.shape[0] > 1 else torch.zeros_like(x[0])
    return _mean(x) - z * std


def _gaussian(x, f, gen, agg, *, mu, sigma):
    if gen is None:
        raise ValueError("the gaussian attack needs a torch.Generator")
    noise = torch.randn((f, x.shape[1]), generator=gen, device=gen.device, dtype=torch.float32)
    return mu + sigma * noise.to(x)


def _mimic(x, f, gen, agg, *, worker):
    if worker == "max_variance":
        # One-shot form of Karimireddy et al.'s heuristic (ByzFL WorkerWithMaxVariance learns the
        # direction over rounds): the honest client furthest out along the top principal direction.
        dev = x - _mean(x)
        top = torch.linalg.svd(dev, full_matrices=False).Vh[0]
        worker = int((dev @ top).abs().argmax())
    if not 0 <= worker < x.shape[0]:
        raise ValueError(f"mimic worker {worker} is not an honest index in [0, {x.shape[0]})")
    return x[worker].clone()


def _inf(x, f, gen, agg):
    return torch.full_like(x[0], math.inf)


def _deviation(x: torch.Tensor, byz: torch.Tensor, f: int, agg: Aggregate) -> float:
    """The damage objective: ||agg([honest; f copies of byz]) - mean(honest)||_2 (NaN counts as -inf)."""
    out = agg(torch.cat([x, byz.expand(f, -1).to(x)]))
    value = float(torch.linalg.vector_norm(out.to(x) - _mean(x)))
    return value if math.isfinite(value) or value == math.inf else -math.inf


def line_search(
    objective: Callable[[float], float], grid: Sequence[float], refine: int
) -> tuple[float, float]:
    """Maximize a 1-D objective: evaluate the grid, then golden-section search between the best
    point's grid neighbours (past the largest point: up to twice it) for `refine` more evaluations.
    Returns (best x, best value); the best is taken over every evaluation, so it is never below
    any grid value.
    """
    xs = sorted(set(float(g) for g in grid))
    ys = [objective(x) for x in xs]
    i = max(range(len(xs)), key=ys.__getitem__)
    best = (xs[i], ys[i])
    lo = xs[i - 1] if i > 0 else xs[i]
    hi = xs[i + 1] if i + 1 < len(xs) else (2 * xs[i] if xs[i] > 0 else 1.0)
    golden = (math.sqrt(5) - 1) / 2
    c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fc = fd = None
    for _ in range(refine):
        if fc is None:
            fc = objective(c)
            best = max(best, (c, fc), key=lambda p: p[1])
        elif fd is None:
            fd = objective(d)
            best = max(best, (d, fd), key=lambda p: p[1])
        elif fc >= fd:  # maximum in [lo, d]
            hi, d, fd = d, c, fc
            c, fc = hi - golden * (hi - lo), None
        else:  # maximum in [c, hi]
            lo, c, fc = c, d, fd
            d, fd = lo + golden * (hi - lo), None
    return best


def _optimal(base):
    def run(x, f, gen, agg, *, grid, refine):
        if f == 0:
            return _mean(x)
        key = "tau" if base is _ipm else "z"

        def damage(t: float) -> float:
            return _deviation(x, base(x, f, gen, agg, **{key: t}), f, agg)

        factor, _ = line_search(damage, grid, refine)
        return base(x, f, gen, agg, **{key: factor})

    return run


# --- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    """A registered update attack: its function, default options, and an option check."""

    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], str | None] = lambda opts: None
    needs_aggregate: bool = False


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(name: str, spec: AttackSpec) -> None:
    if name in ATTACKS:
        raise ValueError(f"attack {name!r} is registered twice")
    ATTACKS[name] = spec


def available_attacks() -> list[str]:
    return sorted(ATTACKS)


def attack(
    name: str,
    honest: torch.Tensor,
    num_byzantine: int,
    generator: torch.Generator | None,
    aggregate: Aggregate | None = None,
    **options: Any,
) -> torch.Tensor:
    """The `num_byzantine` vectors `[f, d]` sent by the Byzantine clients under attack `name`.

    `aggregate` (`[n, d] -> [d]`, receiving honest rows first) is used by `optimal_*` only.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(available_attacks())}")
    spec = ATTACKS[name]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ValueError(f"attack {name!r} got unknown options {unknown}; allowed: {sorted(spec.defaults)}")
    opts = {**spec.defaults, **options}
    problem = spec.check(opts)
    if problem:
        raise ValueError(f"attack {name!r}: {problem}")
    if spec.needs_aggregate and aggregate is None:
        raise ValueError(f"attack {name!r} needs the server's `aggregate` callable")
    if honest.ndim != 2 or honest.shape[0] < 1 or not honest.is_floating_point():
        raise ValueError(f"honest must be a floating [h >= 1, d] matrix, got {honest.dtype} {tuple(honest.shape)}")
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
        raise ValueError(f"num_byzantine must be a non-negative int, got {num_byzantine!r}")
    work = honest.to(torch.promote_types(honest.dtype, torch.float32))
    out = spec.fn(work, num_byzantine, generator, aggregate, **opts)
    return out.expand(num_byzantine, -1).to(honest.dtype).clone()


def _number(key: str, low: float = -math.inf, *, allow_none: bool = False):
    def check(opts):
        value = opts[key]
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
            return f"{key} must be a finite number >= {low}, got {value!r}"
        return None

    return check


def _check_search(opts):
    grid, refine = opts["grid"], opts["refine"]
    if len(grid) == 0 or not all(isinstance(g, (int, float)) and math.isfinite(g) for g in grid):
        return f"grid must be a non-empty sequence of finite numbers, got {grid!r}"
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        return f"refine must be a non-negative int, got {refine!r}"
    return None


def _check_mimic(opts):
    w = opts["worker"]
    if w == "max_variance" or (isinstance(w, int) and not isinstance(w, bool) and w >= 0):
        return None
    return f"worker must be a non-negative int or 'max_variance', got {w!r}"


def _all(*checks):
    return lambda opts: next((p for p in (c(opts) for c in checks) if p), None)


_SEARCH = {"grid": DEFAULT_GRID, "refine": DEFAULT_REFINE}
register_attack("sign_flip", AttackSpec(_sign_flip, {"scale": 1.0}, _number("scale", 0.0)))
register_attack("ipm", AttackSpec(_ipm, {"tau": 0.1}, _number("tau", 0.0)))
register_attack("alie", AttackSpec(_alie, {"z": None}, _number("z", allow_none=True)))
_GAUSSIAN_CHECK = _all(_number("mu"), _number("sigma", 0.0))
register_attack("gaussian", AttackSpec(_gaussian, {"mu": 0.0, "sigma": 1.0}, _GAUSSIAN_CHECK))
register_attack("mimic", AttackSpec(_mimic, {"worker": 0}, _check_mimic))
register_attack("inf", AttackSpec(_inf))
register_attack("optimal_ipm", AttackSpec(_optimal(_ipm), _SEARCH, _check_search, needs_aggregate=True))
register_attack("optimal_alie", AttackSpec(_optimal(_alie), _SEARCH, _check_search, needs_aggregate=True))


# --- data attack, client selection ---------------------------------------------------------------


def flip_labels(labels: np.ndarray, num_classes: int, rule: str = "reverse") -> np.ndarray:
    """Label flipping (Fang et al. '20): 'reverse' maps c -> C-1-c, 'shift' maps c -> (c+1) mod C.

    >>> flip_labels(np.array([0, 1, 2]), 3).tolist()
    [2, 1, 0]
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    if rule == "reverse":
        return (num_classes - 1 - labels).astype(labels.dtype)
    if rule == "shift":
        return ((labels + 1) % num_classes).astype(labels.dtype)
    raise ValueError(f"unknown label flipping rule {rule!r}; use 'reverse' or 'shift'")


def choose_byzantine(num_clients: int, f: int, seed: int) -> list[int]:
    """The sorted ids of the `f` Byzantine clients among `num_clients`, a function of `seed` alone."""
    if num_clients < 0 or not 0 <= f <= num_clients:
        raise ValueError(f"need 0 <= f <= num_clients, got f={f}, num_clients={num_clients}")
    perm = torch.randperm(num_clients, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) for i in perm[:f])


# --- malformed payloads --------------------------------------------------------------------------

MALFORMED_KINDS = (
    "nan", "inf", "wrong_shape", "wrong_dtype", "missing_key", "extra_key", "oversized", "pickle", "truncated",
)


def malformed(
    kind: str, tensors: Mapping[str, torch.Tensor], *, factor: int = 64
) -> dict[str, torch.Tensor] | bytes:
    """A corrupted copy of a well-formed payload `tensors`, for validation tests (input untouched).

    Dicts are meant to go through `payload.encode`; bytes are sent as they are. Every kind is
    rejected by `fedlora.fl.payload.decode(blob, expected=spec_of(tensors), max_bytes=cap)`:
    nan/inf by the finiteness check, wrong_shape/wrong_dtype by the spec, missing_key/extra_key by
    the key set, `oversized` (an extra tensor of `factor` times the payload's tensor bytes) by any
    `max_bytes` cap below that size before anything is parsed -- and by the key set otherwise --,
    `pickle` (torch.save bytes) and `truncated` (safetensors bytes cut short) by the parser.
    `nan`, `inf`, `wrong_shape` and `wrong_dtype` change the first floating tensor by sorted name.
    """
    if kind not in MALFORMED_KINDS:
        raise ValueError(f"unknown malformed kind {kind!r}; available: {', '.join(MALFORMED_KINDS)}")
    out = {name: t.detach().clone() for name, t in sorted(tensors.items())}
    floats = [name for name, t in out.items() if t.is_floating_point() and t.numel() > 0]
    if kind in ("nan", "inf", "wrong_shape", "wrong_dtype") and not floats:
        raise ValueError(f"malformed {kind!r} needs a non-empty floating tensor")
    if kind in ("nan", "inf"):
        out[floats[0]].view(-1)[0] = math.nan if kind == "nan" else math.inf
    elif kind == "wrong_shape":  # e.g. a LoRA factor of rank r + 1
        t = out[floats[0]]
        out[floats[0]] = torch.cat([t, t[:1]]) if t.ndim else t.reshape(1)
    elif kind == "wrong_dtype":
        t = out[floats[0]]
        out[floats[0]] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    elif kind == "missing_key":
        out.pop(next(iter(out)), None)
    elif kind == "extra_key":
        out["extra.lora_X"] = torch.zeros(1)
    elif kind == "oversized":
        nbytes = max(1, sum(t.numel() * t.element_size() for t in out.values()))
        out["oversized.padding"] = torch.zeros(factor * nbytes, dtype=torch.uint8)
    elif kind == "pickle":
        buf = io.BytesIO()
        torch.save(out, buf)
        return buf.getvalue()
    elif kind == "truncated":
        blob = encode(out)
        return blob[: max(9, len(blob) - 16)]
    return out
