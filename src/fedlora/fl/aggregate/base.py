"""Links, requirements and the registry shared by every aggregation rule and pre-aggregator.

A *link* is one step of a chain (optax-style: explicit state in, explicit state out):

    pre-aggregator:  (x: Tensor[n, d], state) -> (Tensor[n', d], state)
    rule:            (x: Tensor[n, d], state) -> (Tensor[d],     state)

Each link records its validity conditions as data (`requires`: condition text + predicate on
(n, f)), so a chain can refuse a configuration before a run starts, with a message naming the
rule, the condition and the numbers, e.g. ``krum needs n > 2f + 2 (n=5, f=2)``.

Rule and pre-aggregator files end with `@register(name, kind)` on a factory
`factory(f, **options) -> Link`; `build_link` validates the name and the options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

State = dict[str, Tensor]
Requirement = tuple[str, Callable[[int, int], bool]]
# (x, state, generator, weights) -> (output, state)
Apply = Callable[[Tensor, State, "torch.Generator | None", "Tensor | None"], tuple[Tensor, State]]

RULE = "rule"
PRE = "pre-aggregator"

# Breakdown point 1/2: a majority of honest vectors is needed by every robust statistic here.
HONEST_MAJORITY: Requirement = ("n > 2f", lambda n, f: n > 2 * f)
# Blanchard et al. (NeurIPS'17, Prop. 1): Krum's score uses n - f - 2 neighbours, which must outnumber f.
KRUM_BOUND: Requirement = ("n > 2f + 2", lambda n, f: n > 2 * f + 2)
AT_LEAST_ONE: Requirement = ("n >= 1", lambda n, f: n >= 1)


def ensure(name: str, n: int, f: int, *requirements: Requirement, note: str = "") -> None:
    """Raise ValueError naming `name`, the first failed condition and (n, f)."""
    for text, holds in requirements:
        if not holds(n, f):
            raise ValueError(f"{name} needs {text} (n={n}{note}, f={f})")


def check_f(name: str, f: Any) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: f (number of tolerated Byzantine clients) must be an int >= 0, got {f!r}")
    return f


def positive(name: str, option: str, value: Any, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "int" if integer else "number"
        raise ValueError(f"{name}: {option} must be a positive {kind}, got {value!r}")
    return value


def _no_state(d: int, dtype: torch.dtype, device: torch.device | None) -> State:
    return {}


def _same_rows(n: int) -> int:
    return n


@dataclass(frozen=True)
class Link:
    """One step of a chain; build with a registered factory, not by hand."""

    name: str
    kind: str  # RULE or PRE
    f: int
    apply: Apply
    requires: tuple[Requirement, ...] = (AT_LEAST_ONE,)
    init: Callable[[int, torch.dtype, torch.device | None], State] = _no_state
    rows_out: Callable[[int], int] = _same_rows
    needs_generator: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, n: int, note: str = "") -> None:
        ensure(self.name, n, self.f, *self.requires, note=note)


def stateless(fn: Callable[[Tensor], Tensor]) -> Apply:
    """Lift `x -> out` to a link's apply (no state, no generator, weights ignored)."""

    def apply(x, state, generator=None, weights=None):
        return fn(x), state

    return apply


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances [n, n] from explicit differences (no ||a||^2 + ||b||^2 - 2ab cancellation,
    which in float32 would blur honest distances once an outlier of norm 1e6 is present)."""
    return torch.cdist(x.unsqueeze(0), x.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]


def row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def clip_rows(x: Tensor, threshold: Tensor | float) -> Tensor:
    """x_i * min(1, c / ||x_i||); rows of norm 0 are kept."""
    norms = row_norms(x)
    scale = torch.clamp(torch.as_tensor(threshold, dtype=x.dtype, device=x.device) / norms, max=1.0)
    scale = torch.where(norms > 0, scale, torch.ones_like(scale))
    return x * scale.unsqueeze(1)


# ---------------------------------------------------------------- registry

Factory = Callable[..., Link]
_REGISTRY: dict[str, tuple[str, Factory]] = {}


def register(name: str, kind: str) -> Callable[[Factory], Factory]:
    """Register `factory(f, **options) -> Link` under `name` as a RULE or a PRE-aggregator."""
    if kind not in (RULE, PRE):
        raise ValueError(f"kind must be {RULE!r} or {PRE!r}, got {kind!r}")

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name][1] is not factory:
            raise ValueError(f"aggregator name {name!r} is registered twice")
        _REGISTRY[name] = (kind, factory)
        return factory

    return deco


def available(kind: str | None = None) -> list[str]:
    """Registered names (all, or only RULE / PRE)."""
    return sorted(k for k, (kd, _) in _REGISTRY.items() if kind is None or kd == kind)


def kind_of(name: str) -> str:
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; registered: {', '.join(available())}")
    return _REGISTRY[name][0]


def build_link(name: str, f: int, options: dict[str, Any] | None = None) -> Link:
    kind_of(name)
    f = check_f(name, f)
    options = dict(options or {})
    try:
        return _REGISTRY[name][1](f, **options)
    except TypeError as err:  # unknown or missing option names
        raise ValueError(f"bad options for {name}: {options} ({err})") from None
