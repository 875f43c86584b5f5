"""The server's round, the same in simulation and under Flower: sample, receive and validate,
combine, record the row. A transport (in process, or Flower's grid) is the only difference.

    server = ServerRuntime(cfg, method, initial_adapter, num_clients, seed, declared=lambda cid: size)
    sampled = server.sample(r)
    update, row = server.receive(cid, blob_or_payload, declared, row, timer, r)   # per reply
    skip_reason = server.combine_round(state, updates, ctx)       # the chain; state.server updated
    row = server.server_row(state, sampled, rows, ctx, skip_reason)

Client sampling (`fl.sampling`): 'fixed' draws exactly m = round(client_fraction * N) of N
without replacement; 'poisson' lets each client join with probability q = client_fraction, so
a round's size varies (it can be 0). 'auto' (the default) is 'poisson' when DP is on (the
sampler its accountant assumes) and 'fixed' otherwise. The privacy report names the one used.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from fedlora.fl.attacks import choose_byzantine
from fedlora.fl.combine import Combine, RoundContext, SkipRound, Transform, check_composition, resolve_sampling
from fedlora.fl.dp import DPMean
from fedlora.fl.faults import StaleMerge
from fedlora.fl.methods import ClientUpdate, Method
from fedlora.fl.payload import PayloadError, encode
from fedlora.fl.robust_round import AttackInjection, RobustMean
from fedlora.fl.schema import PayloadSchema, SideChannel, upload_schema
from fedlora.fl.streams import Streams

log = logging.getLogger("fedlora")


class MinReplies(Transform):
    """Skip the round when fewer valid updates than `fl.min_replies` reached the server."""

    name, stage = "", 35

    def __init__(self, needed: int):
        self.needed = needed

    def apply(self, updates, st, ctx):
        ctx.notes["replies"] = len(updates)
        if len(updates) < self.needed:
            raise SkipRound(f"{len(updates)} valid replies < fl.min_replies={self.needed}")
        return updates, st


class SideChannelCollect(Transform):
    """Side channels leave the updates and go to their handler, which keeps them in its state field."""

    stage = 20

    def __init__(self, state_field: str, channels: tuple[SideChannel, ...], absorb):
        self.name, self.channels, self.absorb = state_field, channels, absorb

    def apply(self, updates, st, ctx):
        out = []
        for u in updates:
            tensors = u.tensors
            for channel in self.channels:
                tensors, inside = channel.split(tensors)
                if inside:
                    st = self.absorb(st, channel, u.client_id, inside)
            out.append(ClientUpdate(u.client_id, tensors, u.num_examples))
        return out, st


class ServerRuntime:
    """Server-side state that is not the run state: schemas, sampler, Byzantine ids, the combine chain."""

    def __init__(self, cfg, method: Method, initial: dict, num_clients: int, seed: int, *,
                 declared=None, rule=None):
        self.cfg, self.method = cfg, method
        self.declared = declared
        """cid -> the client's declared data size (simulation), or None: deployment, where the server
        knows nothing of a node's data and caps counts at fl.max_examples."""
        self.streams = Streams(seed)
        self.num_clients = n = num_clients
        channels = tuple(getattr(rule, "side_channels", ()))
        # A method's own side channels travel in its payload (its schema has them) and reach its aggregate.
        own = tuple(SideChannel(prefix, prefix) for prefix in method.side_channels)
        who = getattr(rule, "name", None) if channels else f"method {method.name!r}"
        check_composition(cfg, method, channels + own, who)
        self.sampling = "fixed" if method.pooled else resolve_sampling(cfg)
        self.q = 1.0 if method.pooled else min(1.0, cfg.fl.client_fraction)
        self.num_sampled = 1 if method.pooled else max(1, round(cfg.fl.client_fraction * n))
        """Clients per round: exactly (fixed) or the round of its expectation (poisson)."""
        self.max_examples = cfg.fl.max_examples
        self.schemas: list[PayloadSchema] = [upload_schema(method, initial, cid, channels) for cid in range(n)]
        rb = cfg.robust
        self.robust_on = not method.pooled and (rb.aggregator is not None or rb.byzantine > 0 or rb.momentum is not None)
        self.byzantine = choose_byzantine(n, rb.byzantine, seed) if self.robust_on else []
        self.update_attack = self.robust_on and rb.attack != "none" and rb.byzantine > 0
        self.combine = Combine(method, self._transforms(rule, channels))
        self.dp: DPMean | None = self.combine.get("dp")

    def _transforms(self, rule, channels) -> list[Transform]:
        cfg, method = self.cfg, self.method
        out: list[Transform] = []
        if not method.pooled and cfg.fl.deadline is not None and cfg.fl.straggler_policy == "stale":
            out.append(StaleMerge(cfg.fl.staleness, rebase=method.mean_aggregation))
        if channels:
            out.append(SideChannelCollect(rule.state_field, channels, rule.absorb))
        robust = None
        if self.robust_on and cfg.robust.aggregator is not None:
            robust = RobustMean(cfg.robust.aggregator, cfg.robust.f, self.num_sampled)
        if self.update_attack:
            out.append(AttackInjection(cfg.robust.attack, cfg.robust.attack_args, robust))
        if cfg.dp.enabled:
            fixed = self.sampling == "fixed"  # Poisson: a round's noised mean is released whoever arrived
            out.append(MinReplies(cfg.fl.min_replies if fixed else 0))
            q = self.num_sampled / self.num_clients if fixed else self.q
            m = self.num_sampled if fixed else q * self.num_clients  # the fixed denominator: m, or qN
            out.append(DPMean(cfg.dp, self.num_clients, q, self.sampling, m=m))
        else:
            out.append(MinReplies(1 if method.pooled else cfg.fl.min_replies))
            if robust is not None:
                out.append(robust)
        return out

    # --- sampling ------------------------------------------------------------------------------
    def sample(self, round_index: int) -> list[int]:
        n = self.num_clients
        if self.method.pooled:
            return [0]
        if self.sampling == "poisson":
            u = self.streams.numpy("client_sampling.poisson", round_index).random(n)
            return np.flatnonzero(u < self.q).tolist()
        rng = self.streams.numpy("client_sampling", round_index)
        return sorted(rng.choice(n, size=self.num_sampled, replace=False).tolist())

    def is_attacker(self, cid: int) -> bool:
        """A Byzantine client that sends an attack instead of what it trained (it does not train)."""
        return self.update_attack and cid in self.byzantine

    # --- receiving -----------------------------------------------------------------------------
    def cap(self, cid: int) -> int:
        """The largest example count client `cid` may report (its declared size, else fl.max_examples)."""
        declared = None if self.declared is None else self.declared(cid)
        return self.max_examples if declared is None else max(1, min(declared, self.max_examples))

    def receive(self, cid: int, payload: dict | bytes, num_examples: int, row: dict, timer,
                round_index: int | None) -> tuple[ClientUpdate | None, dict]:
        """Encode what client `cid` sends (bytes are taken as they are), decode and validate it with the
        client's schema. A rejected payload gives (None, row with 'rejected' and 'reject_reason')."""
        with timer("serialize"):
            blob = payload if isinstance(payload, (bytes, bytearray)) else encode(
                payload, {"num_examples": num_examples}, round_index=round_index, client_id=cid)
            row["bytes_up"] = len(blob) if payload else 0
            try:
                update = self.schemas[cid].receive(blob, round_index=round_index, sender=cid,
                                                   max_examples=self.cap(cid))
            except PayloadError as exc:
                log.warning("round %s: payload from client %s rejected: %s", round_index, cid, exc)
                row.update({"rejected": True, "reject_reason": exc.reason})
                return None, row
        return update, row

    # --- combining -----------------------------------------------------------------------------
    def combine_round(self, state, updates: list[ClientUpdate], ctx: RoundContext) -> str | None:
        """Run the chain; the new server state lands in `state.server`. Returns the skip reason, or None."""
        ctx.num_rejected += sum(1 for row in ctx.rows if row.get("rejected"))
        robust = self.combine.get("aggregator")
        if robust is not None:
            ctx.notes["robust_f"] = robust.chain_for(ctx.num_rejected).f  # attackers rejected later lower it too
        with ctx.timer("aggregate"):
            try:
                state.server = self.combine(state, updates, ctx)
            except SkipRound as exc:
                log.warning("round %d skipped: %s; the server state is unchanged", ctx.round_index, exc)
                return str(exc)
        return None

    def server_row(self, state, sampled: list[int], rows: list[dict], ctx: RoundContext,
                   skip_reason: str | None) -> dict:
        """The round's 'server' row: who was sampled, bytes, rejections, skips, faults, DP's epsilon."""
        row = {"client": "server", "sampled": sampled, "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
               "bytes_down": sum(r.get("bytes_down", 0) for r in rows), **rejections(rows),
               "replies": ctx.notes.pop("replies", 0), "skipped": skip_reason is not None,
               "failed": [r["client"] for r in rows if r.get("failed")]}
        row.update({"stale_applied": [], **ctx.notes})
        if skip_reason is not None:  # nothing was applied
            row.update({"skip_reason": skip_reason, "stale_applied": []})
        if self.robust_on:
            row["byzantine_sampled"] = [c for c in sampled if c in self.byzantine]
        if self.dp is not None:
            row.update(self.dp.metrics(state.dp))
        return row


def rejections(rows: list[dict]) -> dict:
    """The server row's rejection counts: who, how many, and how many per reason code."""
    rejected = [row for row in rows if row.get("rejected")]
    reasons: dict[str, int] = defaultdict(int)
    for row in rejected:
        reasons[row.get("reject_reason", "invalid")] += 1
    return {"rejected": [row["client"] for row in rejected], "num_rejected": len(rejected),
            "reject_reasons": dict(sorted(reasons.items()))}
