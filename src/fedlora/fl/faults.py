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
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedlora.fl.methods import ClientUpdate

if TYPE_CHECKING:
    from fedlora.fl.engine import RunState, _Timer

log = logging.getLogger("fedlora")

_DROPOUT_SALT, _LATENCY_SALT = 2, 3  # salt 1 is FLoRA's fresh adapter seed (engine._fresh_seed)


def _uniform(seed: int, round_index: int, client_id: int, salt: int) -> float:
    return float(np.random.default_rng([seed, round_index, client_id, salt]).random())


def drops_out(seed: int, round_index: int, client_id: int, probability: float) -> bool:
    """Whether `client_id` is unavailable in `round_index` (independent of every other client)."""
    return probability > 0 and _uniform(seed, round_index, client_id, _DROPOUT_SALT) < probability


def latency(seed: int, round_index: int, client_id: int, mean: float) -> float:
    """Simulated seconds the client's round takes: Exponential(mean), by inverse CDF of one uniform."""
    return float(-mean * np.log1p(-_uniform(seed, round_index, client_id, _LATENCY_SALT)))


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
        tensors = {k: (reference[k].to(torch.float32) + (v.to(torch.float32) - then[k].to(torch.float32))).to(v.dtype)
                   for k, v in tensors.items()}
    return ClientUpdate(int(entry["client"]), tensors, entry["num_examples"] * staleness)


class ClientFaults:
    """Mixin of `Simulator`: faults inside a round. Uses its `cfg`, `method`, `seed`, `train_sets`,
    `client_round` and `_reference`. Pooled methods (the centralized reference) get no faults."""

    def _draw_faults(self, sampled: list[int], round_index: int) -> RoundFaults:
        fl = self.cfg.fl
        if self.method.pooled:
            return RoundFaults()
        return draw_faults(self.seed, round_index, sampled, fl.dropout, fl.deadline, fl.latency)

    def _per_client_fields(self, state: RunState) -> list[str]:
        """RunState fields holding one entry per client (clients, optimizer, momentum, and any added later)."""
        n = len(self.train_sets)
        return [f.name for f in dataclasses.fields(state)
                if isinstance(getattr(state, f.name), list) and len(getattr(state, f.name)) == n]

    def _safe_client_round(self, state: RunState, cid: int, round_index: int,
                           timer: _Timer) -> tuple[ClientUpdate | None, dict]:
        """`client_round`, but a client that raises (out of memory, bad data, a method bug) is
        reported with its id and error, its per-client state is left as it was, and the round goes on."""
        result, failure = self._guarded(state, cid, round_index,
                                        lambda: self.client_round(state, cid, round_index, timer))
        return result if failure is None else (None, {**failure, "bytes_up": 0, "bytes_down": 0})

    def _guarded(self, state: RunState, cid: int, round_index: int, step):
        """(step(), None); if it raises, the client's per-client state is restored, the error logged,
        and (None, a row reporting the client with its id and error) comes back instead."""
        names = self._per_client_fields(state)
        saved = {name: getattr(state, name)[cid] for name in names}
        try:
            return step(), None
        except Exception as exc:  # noqa: BLE001 -- one client must never crash the run
            for name, value in saved.items():
                getattr(state, name)[cid] = value
            error = f"{type(exc).__name__}: {exc}"
            log.warning("round %d: client %s failed (%s); the round goes on without it", round_index, cid, error)
            return None, {"client": cid, "error": error, "failed": True}

    def _hold_late(self, state: RunState, update: ClientUpdate, round_index: int) -> None:
        """A straggler's valid update: dropped, or buffered for the next round (policy 'stale')."""
        if self.cfg.fl.straggler_policy != "stale":
            return
        reference = self._reference(state.server, update.client_id) if self.method.mean_aggregation else None
        state.stale = [*(state.stale or []), stale_entry(update, round_index, reference)]

    def _take_stale(self, state: RunState, round_index: int, fresh: list[ClientUpdate]) -> list[ClientUpdate]:
        """Last round's buffered late updates, rebased and down-weighted; those of clients that
        replied in time this round are superseded. This round's own late updates stay buffered."""
        pending = state.stale or []
        older = [e for e in pending if e["round"] < round_index]
        if not older:
            return []
        state.stale = [e for e in pending if e["round"] >= round_index] or None
        replied = {u.client_id for u in fresh}
        reference = None
        out = []
        for entry in older:
            if int(entry["client"]) in replied:
                continue
            if "reference" in entry and reference is None:
                reference = self._reference(state.server, int(entry["client"]))
            out.append(stale_update(entry, self.cfg.fl.staleness, reference))
        return out
