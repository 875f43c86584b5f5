"""Chains of pre-aggregators ending in a rule, and aggregation of dicts of tensors.

    chain = build_chain(["arc", "nnm", {"trimmed_mean": {}}], f=1)
    chain.validate(n)                       # before a run: ValueError naming rule and condition
    state = chain.init(d)                   # explicit state (centered clipping's history)
    v, state = chain(x, state, generator)   # x: Tensor[n, d] -> v: Tensor[d]

The state is a flat {"<index>.<link>.<key>": tensor} dict, returned, never mutated, so it
checkpoints like any other tensors. Inputs in float32/float64 are aggregated in their own
dtype; float16/bfloat16 inputs are aggregated in float32 (sorting and norms in half precision
lose too much) and the output is cast back, so the result always has x's dtype and device.
Non-finite inputs are refused (ValueError naming the rows): drop such clients before
aggregating, counting them against f, rather than letting a NaN reach the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlora.fl.aggregate.base import PRE, RULE, Link, State, build_link, check_f, kind_of

# Importing the rule files registers them.
from fedlora.fl.aggregate import coordinate, distance, geometric, preagg  # noqa: F401  isort: skip

TensorDict = dict[str, Tensor]


@dataclass(frozen=True)
class Chain:
    """Pre-aggregators then one rule, all built with the same f."""

    links: tuple[Link, ...]
    f: int

    @property
    def names(self) -> list[str]:
        return [link.name for link in self.links]

    @property
    def needs_generator(self) -> bool:
        return any(link.needs_generator for link in self.links)

    def validate(self, n: int) -> None:
        """Raise ValueError if the chain cannot run on n vectors (rows are tracked through the chain)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"need at least one vector to aggregate, got n={n!r}")
        note = ""
        for link in self.links:
            link.check(n, note)
            if link.rows_out(n) != n:
                n, note = link.rows_out(n), f" after {link.name}"

    def init(self, d: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> State:
        state: State = {}
        for i, link in enumerate(self.links):
            state.update({f"{i}.{link.name}.{k}": v for k, v in link.init(d, dtype, device).items()})
        return state

    def __call__(
        self,
        x: Tensor,
        state: State | None = None,
        generator: torch.Generator | None = None,
        weights: Tensor | Sequence[float] | None = None,
    ) -> tuple[Tensor, State]:
        _check_input(x)
        n, d = x.shape
        self.validate(n)
        if self.needs_generator and generator is None:
            raise ValueError(f"chain {self.names} needs a seeded torch.Generator (pass generator=...)")
        work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        if weights is not None:
            weights = self._check_weights(weights, n)
        state = self.init(d, work.dtype, x.device) if state is None else state
        new_state: State = {}
        for i, link in enumerate(self.links):
            prefix = f"{i}.{link.name}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            work, own = link.apply(work, own, generator, weights)
            new_state.update({prefix + k: v for k, v in own.items()})
        return work.to(x.dtype), new_state

    def _check_weights(self, weights, n: int) -> Tensor:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not w.sum() > 0:
            raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum, got {weights!r}")
        rows = n
        for link in self.links[:-1]:
            rows = link.rows_out(rows)
        if self.links[-1].name == "mean" and rows != n:
            raise ValueError(f"weights cannot follow rows through {self.names}: a pre-aggregator changes n")
        return w


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"expected a floating-point Tensor[n, d], got {type(x).__name__} {getattr(x, 'shape', '')}")
    bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite values in rows {bad}: drop these clients before aggregating")


def _parse_item(item: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        (name, options), = item.items()
        if options is None or isinstance(options, dict):
            return name, dict(options or {})
    raise ValueError(f"a chain item is a name or {{name: options}} with one name, got {item!r}")


def build_chain(spec: Sequence[str | dict[str, Any]] | str, f: int) -> Chain:
    """Build a Chain from names / {name: options}; the last item must be a rule, the others pre-aggregators."""
    f = check_f("build_chain", f)
    items = [spec] if isinstance(spec, (str, dict)) else list(spec)
    if not items:
        raise ValueError("an aggregation chain needs at least a rule")
    parsed = [_parse_item(item) for item in items]
    kinds = [kind_of(name) for name, _ in parsed]
    if kinds[-1] != RULE:
        raise ValueError(f"the last item of a chain must be a rule, got the {kinds[-1]} {parsed[-1][0]!r}")
    for pos, ((name, _), kind) in enumerate(zip(parsed[:-1], kinds)):
        if kind != PRE:
            raise ValueError(f"only pre-aggregators may precede the rule, got the {kind} {name!r} at position {pos}")
    links = [build_link(name, f, options) for name, options in parsed]
    return Chain(tuple(links), f)


# ---------------------------------------------------------------- dicts of tensors


def _flatten(payloads: Sequence[TensorDict]) -> tuple[Tensor, list[tuple[str, torch.Size, torch.dtype]]]:
    if not payloads:
        raise ValueError("no payloads to aggregate")
    ref = payloads[0]
    keys = sorted(ref)
    if not keys:
        raise ValueError("payloads are empty dicts")
    layout = [(k, ref[k].shape, ref[k].dtype) for k in keys]
    for i, p in enumerate(payloads[1:], start=1):
        if set(p) != set(ref):
            missing, extra = sorted(set(ref) - set(p)), sorted(set(p) - set(ref))
            raise ValueError(f"payload {i} keys differ from payload 0: missing {missing}, extra {extra}")
        for k, shape, dtype in layout:
            if p[k].shape != shape or p[k].dtype != dtype:
                raise ValueError(
                    f"payload {i}[{k!r}] is {tuple(p[k].shape)} {p[k].dtype}, payload 0 has {tuple(shape)} {dtype}"
                )
    dtype = ref[keys[0]].dtype
    for _, _, dt in layout:
        dtype = torch.promote_types(dtype, dt)
    x = torch.stack([torch.cat([p[k].detach().reshape(-1).to(dtype) for k in keys]) for p in payloads])
    return x, layout


def aggregate_tensors(
    chain: Chain,
    payloads: Sequence[TensorDict],
    weights: Tensor | Sequence[float] | None = None,
    state: State | None = None,
    generator: torch.Generator | None = None,
) -> tuple[TensorDict, State]:
    """Aggregate dicts with identical keys/shapes/dtypes: flatten (sorted keys) to [n, d], run the
    chain, unflatten. Each output tensor has its key's shape and dtype."""
    x, layout = _flatten(payloads)
    vec, state = chain(x, state, generator=generator, weights=weights)
    out, start = {}, 0
    for k, shape, dtype in layout:
        size = shape.numel()
        out[k] = vec[start : start + size].reshape(shape).to(dtype)
        start += size
    return out, state
