"""The server's combine step as a declared chain of transforms (optax-style), and its composition rules.

    check_composition(cfg, method, side_channels)      # refuses bad pairs, before round 1
    combine = Combine(method, transforms)               # ServerRuntime builds the transforms
    server = combine(state, updates, ctx)               # one round; ctx.notes feed the server row

Each transform has a `name`, a `stage` (its place in the chain) and `apply(updates, st, ctx) ->
(updates, st)`. Its state lives in the run state's field of the same name (`RunState.stale`,
`.aggregator`, `.dp`, ...), so checkpoints carry it without knowing what it is. Random draws come
from the named streams of `ctx.streams` (fl/streams.py). The chain, in stage order:

    10 stale        late updates of the previous round join, rebased and down-weighted (fl/faults.py)
    20 side         side channels (Concordia's scorers) leave the updates for their own handler
    30 attack       simulated update attackers send, from the honest updates (fl/robust_round.py)
    40 dp | robust  DP-FedAvg's clipped noised mean (fl/dp.py), or a robust chain (fl/robust_round.py):
                    the updates become one, download + combined delta, uniform weights
    --              the method's own aggregate (its weighted mean, stacking, clusters, ...)

A transform may raise `SkipRound(reason)`: the server state is unchanged and the reason logged
and recorded. An invalid combination is refused by `check_composition` before round 1 with a
message naming both parts; eligibility is derived from what methods declare
(`Method.mean_aggregation`), never from lists of names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedlora.config import ConfigError
from fedlora.fl.methods import ClientUpdate, Method, available_methods, build_method
from fedlora.fl.streams import Streams

if TYPE_CHECKING:
    from fedlora.fl.schema import SideChannel
    from fedlora.fl.state import RunState
    from fedlora.fl.timer import Timer

log = logging.getLogger("fedlora")


class SkipRound(Exception):
    """The round cannot be combined (e.g. too few updates for the robust rule to tolerate f)."""


@dataclass
class RoundContext:
    """What a transform may use in one round (no engine object: the same in simulation and Flower)."""

    round_index: int
    server: dict
    method: Method
    streams: Streams
    timer: Timer
    sampled: list[int]
    rows: list[dict]
    """The round's client rows; the attack transform appends the attackers' rows."""
    receive: Callable[[int, dict, int], tuple[ClientUpdate | None, dict]] | None = None
    """Encode, decode and validate a simulated sender's payload as the server does (simulation only)."""
    num_rejected: int = 0
    """Uploads the server rejected this round (senders shown to be faulty)."""
    attackers: list[int] = field(default_factory=list)
    """Sampled, on-line update attackers of this round (simulation only)."""
    declared_examples: Callable[[int], int] = lambda cid: 1
    """Client `cid`'s declared data size (what an attacker reports as its example count)."""
    states: dict[str, Any] = field(default_factory=dict)
    """Every transform's state at the round's start, by name (read-only for the others)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Fields the transforms add to the round's server row."""

    def reference(self, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` downloaded (float32): the point updates are measured from."""
        return download_reference(self.method, self.server, cid)


def download_reference(method: Method, server: dict, cid: int) -> dict[str, torch.Tensor]:
    """What client `cid` downloads from `server`, in float32 on the CPU."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in method.download(server, cid).items()}


class Transform:
    name: ClassVar[str] = ""
    """Also the RunState field that holds the transform's state ('' when it keeps none)."""
    stage: ClassVar[int] = 0

    def apply(self, updates: list[ClientUpdate], st: Any, ctx: RoundContext) -> tuple[list[ClientUpdate], Any]:
        raise NotImplementedError


def flat_deltas(method: Method, updates: list[ClientUpdate], ctx: RoundContext, who: str
                ) -> tuple[dict[str, torch.Tensor], list[str], list[dict[str, torch.Tensor]]]:
    """(download, its sorted names, upload - download per update), all float32."""
    ref = ctx.reference(updates[0].client_id if updates else 0)
    keys = sorted(ref)
    if any(sorted(u.tensors) != keys for u in updates):
        raise ValueError(f"method {method.name!r}: uploads do not carry the downloaded tensors; "
                         f"{who} cannot aggregate them")
    return ref, keys, [{k: u.tensors[k].to(torch.float32) - ref[k] for k in keys} for u in updates]


def unflatten_like(vector: torch.Tensor, ref: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """The flat `vector` cut back into tensors shaped like `ref[k]`, in the order of `keys`."""
    out, start = {}, 0
    for k in keys:
        size = ref[k].numel()
        out[k] = vector[start:start + size].reshape(ref[k].shape)
        start += size
    return out


class Combine:
    """Transforms in stage order, then the method's aggregate."""

    def __init__(self, method: Method, transforms: list[Transform]):
        stages = [t.stage for t in transforms]
        if stages != sorted(stages) or len(set(stages)) != len(stages):
            raise ConfigError("combine transforms out of order or sharing a stage: "
                              + ", ".join(f"{t.name}@{t.stage}" for t in transforms))
        self.method, self.transforms = method, transforms

    def get(self, name: str) -> Transform | None:
        return next((t for t in self.transforms if t.name == name), None)

    def __call__(self, state: RunState, updates: list[ClientUpdate], ctx: RoundContext) -> dict:
        """The new server state; raises SkipRound (state unchanged: transforms commit at the end)."""
        pending = {}
        ctx.states = {t.name: getattr(state, t.name) for t in self.transforms if t.name and hasattr(state, t.name)}
        for t in self.transforms:
            st = getattr(state, t.name) if t.name and hasattr(state, t.name) else None
            updates, pending[t.name] = t.apply(updates, st, ctx)
        if not updates:
            raise SkipRound("no valid update reached the server")
        server = self.method.aggregate(state.server, updates)
        for t in self.transforms:
            if t.name and hasattr(state, t.name):
                setattr(state, t.name, pending[t.name])
        return server


def mean_methods() -> list[str]:
    """Registered methods whose server step starts from a weighted mean (derived, not listed)."""
    out = []
    for name in available_methods():
        m = build_method(name)
        if m.mean_aggregation and not m.pooled and not m.decentralized and not m.side_channels:
            out.append(name)
    return out


def resolve_sampling(cfg) -> str:
    """fl.sampling with 'auto' resolved: Poisson when DP is on (what its accountant assumes), else fixed."""
    if cfg.fl.sampling == "auto":
        return "poisson" if cfg.dp.enabled else "fixed"
    return cfg.fl.sampling


def check_composition(cfg, method: Method, side_channels: tuple[SideChannel, ...] = (),
                      rule: str | None = None) -> None:
    """Refuse, before round 1, every pair of features that cannot be combined, naming both."""
    rb, dp, fl = cfg.robust, cfg.dp, cfg.fl
    update_attack = rb.attack != "none" and rb.byzantine > 0
    needs_mean = [name for name, on in (("robust.aggregator", rb.aggregator is not None),
                                        (f"robust.attack={rb.attack}", update_attack),
                                        ("robust.momentum", rb.momentum is not None),
                                        ("dp", dp.enabled)) if on]
    if needs_mean and not method.pooled and (not method.mean_aggregation or method.side_channels):
        why = (f"its payload carries side channel(s) {list(method.side_channels)} beside the adapter"
               + getattr(method, "side_channels_hint", "")
               if method.mean_aggregation else method.not_mean_because
               or "its server step does not start from a weighted mean")
        raise ConfigError(f"{', '.join(needs_mean)} cannot apply to method {method.name!r}: {why}. "
                          f"They need a method that averages the uploads ({', '.join(mean_methods())})")
    if dp.enabled:
        if method.pooled:
            raise ConfigError(f"dp cannot apply to method {method.name!r}: it is a centralized reference, "
                              "with no clients to protect")
        uncovered = [c.name for c in side_channels if not c.dp_covered]
        if uncovered:
            raise ConfigError(f"dp.enabled and {rule or 'this client rule'} cannot be combined: the side channel(s) "
                              f"{uncovered} leave each client without clipping or noise, so the epsilon reported "
                              "would not cover what the client sends; turn dp off or the side channel off")
        if rb.aggregator is not None:
            raise ConfigError("dp.enabled and robust.aggregator cannot be combined: DP noise is calibrated to the "
                              "sum of clipped updates, which a robust rule replaces (set one of them)")
        if resolve_sampling(cfg) == "poisson" and fl.min_replies > 1:
            raise ConfigError("dp.enabled with fl.sampling=poisson releases every round's noised mean, so "
                              "fl.min_replies cannot skip rounds; leave fl.min_replies=1 or set fl.sampling=fixed")
        if fl.straggler_policy == "stale":
            raise ConfigError("dp.enabled and fl.straggler_policy=stale cannot be combined: a late update applied "
                              "in the next round adds a second clipped update of one client to that round, "
                              "doubling the sensitivity the noise assumes")
