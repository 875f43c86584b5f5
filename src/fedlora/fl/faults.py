"""Simulated client faults: dropouts, stragglers past a deadline, and stale updates (config `fl`).

Every draw comes from a generator seeded by (seed, round, client, salt), like the rest of the
simulator, so a client's fate in a round is reproducible, survives a resume, and does not depend
on which other clients were sampled or on whether faults are on for anything else.

- Dropout: a sampled client is unavailable with probability `fl.dropout`; it neither downloads
  nor trains, and its state is untouched.
- Straggler: a client's round takes a simulated latency L ~ Exponential(mean `fl.latency`); with a
  deadline d, it is late when L > d (probability exp(-d / latency)). A late client still trains
  (its own state moves on, as a real device's would); the server then either drops the update
  (`straggler_policy: drop`) or applies it one round late (`stale`, below).
- Stale rule (FedAsync's constant staleness function, Xie et al. arXiv 1903.03934, with
  staleness tau = 1; FedBuff, Nguyen et al. arXiv 2106.06639, buffers late updates the same way):
  the update joins the next round's aggregation with its example count multiplied by
  `fl.staleness` in (0, 1]. For methods that aggregate a mean of uploads (`mean_aggregation`),
  it is first rebased onto the current download, upload' = download_now + (upload - download_then),
  so it contributes its *change* rather than pulling the model back to last round's start. A
  client that replies in time in that next round supersedes its stale update (dropped).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.fl.combine import Transform
from fedlora.fl.methods import ClientUpdate
from fedlora.fl.streams import Streams

log = logging.getLogger("fedlora")

def drops_out(seed: int, round_index: int, client_id: int, probability: float) -> bool:
    """Whether `client_id` is unavailable in `round_index` (independent of every other client)."""
    return probability > 0 and float(Streams(seed).numpy("dropout", round_index, client_id).random()) < probability


def latency(seed: int, round_index: int, client_id: int, mean: float) -> float:
    """Simulated seconds the client's round takes: Exponential(mean), by inverse CDF of one uniform."""
    return float(-mean * np.log1p(-Streams(seed).numpy("latency", round_index, client_id).random()))


@dataclass
class RoundFaults:
    """Who, among a round's sampled clients, drops out and who will be late."""

    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)


def draw_faults(seed: int, round_index: int, sampled: list[int], dropout: float,
                deadline: float | None, mean_latency: float) -> RoundFaults:
    dropped = [c for c in sampled if drops_out(seed, round_index, c, dropout)]
    late = [] if deadline is None else [
        c for c in sampled if c not in dropped and latency(seed, round_index, c, mean_latency) > deadline]
    return RoundFaults(dropped, late)


def stale_entry(update: ClientUpdate, round_index: int, reference: dict[str, torch.Tensor] | None) -> dict:
    """What the server buffers of a late update (plain tensors and numbers: checkpointed as is)."""
    entry = {"client": update.client_id, "round": round_index, "num_examples": update.num_examples,
             "tensors": update.tensors}
    if reference is not None:
        entry["reference"] = reference
    return entry


def stale_update(entry: dict, staleness: float, reference: dict[str, torch.Tensor] | None) -> ClientUpdate:
    """A buffered late update as it joins this round: rebased (when it has a reference), down-weighted."""
    tensors = entry["tensors"]
    if reference is not None and "reference" in entry:
        then = entry["reference"]
        # Only the downloaded tensors are rebased; a side channel (a scorer) travels as it was sent.
        tensors = {k: (reference[k].to(torch.float32) + (v.to(torch.float32) - then[k].to(torch.float32))).to(v.dtype)
                   if k in then and k in reference else v for k, v in tensors.items()}
    return ClientUpdate(int(entry["client"]), tensors, entry["num_examples"] * staleness)


def per_client_fields(state, num_clients: int) -> list[str]:
    """RunState fields holding one entry per client (clients, optimizer, momentum, and any added later)."""
    return [f.name for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), list) and len(getattr(state, f.name)) == num_clients]


def guarded(state, cid: int, round_index: int, step):
    """(step(), None); if it raises, the client's per-client state is restored, the error logged,
    and (None, a row reporting the client with its id and error) comes back instead: one client
    (out of memory, bad data, a method bug) never crashes the run."""
    names = per_client_fields(state, len(state.clients))
    saved = {name: getattr(state, name)[cid] for name in names}
    try:
        return step(), None
    except Exception as exc:  # noqa: BLE001 -- one client must never crash the run
        for name, value in saved.items():
            getattr(state, name)[cid] = value
        error = f"{type(exc).__name__}: {exc}"
        log.warning("round %d: client %s failed (%s); the round goes on without it", round_index, cid, error)
        return None, {"client": cid, "error": error, "failed": True}


class StaleMerge(Transform):
    """Last round's late updates join this one, rebased and down-weighted (fl.straggler_policy=stale)."""

    name, stage = "stale", 10

    def __init__(self, staleness: float, rebase: bool):
        self.staleness, self.rebase = staleness, rebase
        """rebase: the method aggregates a mean of uploads, so a late update brings its change only."""

    def hold(self, pending: list[dict] | None, update: ClientUpdate, round_index: int,
             reference: dict | None) -> list[dict]:
        """The buffer after a straggler's valid update arrives late in `round_index`."""
        return [*(pending or []), stale_entry(update, round_index, reference if self.rebase else None)]

    def apply(self, updates, st, ctx):
        """Last round's buffered updates join (staleness 1: an older one, left by a skipped round,
        expires); those of clients that replied in time are superseded."""
        r = ctx.round_index
        pending = st or []
        expired = [e for e in pending if e["round"] < r - 1]
        if expired:
            log.info("round %d: %d late update(s) from before round %d expired (a skipped round)",
                     r, len(expired), r - 1)
        older = [e for e in pending if e["round"] == r - 1]
        replied = {u.client_id for u in updates}
        joined = []
        for entry in older:
            if int(entry["client"]) in replied:
                continue
            reference = ctx.reference(int(entry["client"])) if "reference" in entry else None
            joined.append(stale_update(entry, self.staleness, reference))
        ctx.notes["stale_applied"] = [u.client_id for u in joined]
        return [*updates, *joined], [e for e in pending if e["round"] >= r] or None
