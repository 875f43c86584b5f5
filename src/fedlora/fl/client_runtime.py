"""One client's round, the same code in every engine and on a Flower node.

    start   = fresh adapter (FLoRA) or method.start_local(received, own state)    # rank-padded
    trained = local_train(start, trainable=method.train_mask_at(t), rows, weights)
    payload, own state = method.upload(trained, own state)
    payload = start + m_t      with worker momentum (robust.momentum), m_t of g_t = trained - start

The server simulator, the gossip simulator, Concordia (through its client rule) and the Flower
`Node` all call `ClientRuntime.train`; none of them reaches into another engine. Only
`state.clients[cid]`, `state.optimizer[cid]` and `state.momentum[cid]` are read and written.

Worker momentum is part of the client protocol, so every client that trains follows it, label
flippers included (a Byzantine client that flips its labels still runs the protocol; only an
update attack, which replaces the upload, skips training). Randomness comes from the `train` and
`fresh_adapter` streams (`fl/streams.py`), per (round, client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fedlora.fl.cuma_setup import tracked_routing_mass
from fedlora.fl.methods import Method
from fedlora.fl.momentum import momentum_init, momentum_update
from fedlora.fl.streams import Streams
from fedlora.model.lora import (
    adapter_parameters,
    init_adapter_state,
    load_adapter_state,
    rank_scaling,
    set_trainable,
    zero_pad_rank,
)
from fedlora.train.batches import EncodedExamples
from fedlora.train.local import local_train, num_local_steps

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.fl.state import RunState
    from fedlora.fl.timer import Timer


class ClientRuntime:
    """Trains one client's adapter in the shared model and builds what it sends."""

    def __init__(self, model: torch.nn.Module, method: Method, cfg: RunConfig, streams: Streams, pad_id: int,
                 *, momentum: float | None = None, progress: bool = False, steps_factor: int = 1):
        self.model, self.method, self.cfg, self.streams, self.pad_id = model, method, cfg, streams, pad_id
        self.momentum = momentum
        """beta of worker momentum (robust.momentum), or None."""
        self.progress = progress
        self.steps_factor = steps_factor
        """Local steps multiplier (the pooled centralized reference does the whole round's steps)."""

    def start(self, state: RunState, cid: int, round_index: int, received: dict) -> dict:
        """The adapter client `cid` starts the round from (what `received` and its own state give)."""
        if self.method.fresh_each_round:  # FLoRA: a new LoRA on the current base, A seeded, B = 0
            start = init_adapter_state(self.model, self.streams.integer("fresh_adapter", round_index, cid))
        else:
            start = self.method.start_local(received, state.clients[cid])
        rank = self.method.client_rank(cid)
        return start if rank is None else zero_pad_rank(start, rank)

    def train(self, state: RunState, cid: int, round_index: int, received: dict, data: EncodedExamples,
              timer: Timer, sample_weights: np.ndarray | None = None) -> tuple[dict, dict]:
        """(payload, row) of client `cid` in round `round_index`; updates its state in place."""
        method, model = self.method, self.model
        fresh = method.fresh_each_round
        with timer("swap"):
            start = self.start(state, cid, round_index, received)
            load_adapter_state(model, start)
            params = set_trainable(model, method.train_mask_at(round_index))
        steps = num_local_steps(self.cfg.train, len(data)) * self.steps_factor
        live = adapter_parameters(model)
        extra = method.extra_loss(live, received)
        with (timer("train"), torch.random.fork_rng(devices=[]), rank_scaling(model, method.client_rank(cid)),
              tracked_routing_mass(model, getattr(method, "sends_routing_mass", False)) as mass):
            # LoRA dropout draws from torch's global generator; fork it so runs stay independent.
            torch.manual_seed(self.streams.integer("train", round_index, cid, bound=2**31))
            result = local_train(
                model, params, data, self.cfg.train, steps, self.streams.numpy("train", round_index, cid),
                self.pad_id, sample_weights=sample_weights,
                optimizer_state=None if fresh else state.optimizer[cid], extra_loss=extra,
                progress=f"round {round_index} client {cid}" if self.progress else None,
            )
        state.optimizer[cid] = result.optimizer_state
        with timer("swap"):
            trained = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in live.items()}
        trained.update(mass)  # CuMA with expert_weights=routing_mass: what each expert was used for
        payload, state.clients[cid] = method.upload(trained, state.clients[cid])
        if self.momentum is not None:
            payload = self._with_momentum(state, cid, payload, start)
        return payload, {"client": cid, "train_loss": result.loss, "local_steps": result.steps}

    def _with_momentum(self, state: RunState, cid: int, payload: dict, start: dict) -> dict:
        """started + m_t, with m_t the client's momentum of g_t = trained - started (fl/momentum.py)."""
        started = {k: start[k].detach().to("cpu", torch.float32) for k in payload}
        g = {k: payload[k] - started[k] for k in payload}
        if state.momentum is None:
            state.momentum = [None] * len(state.clients)
        own = state.momentum[cid] if state.momentum[cid] is not None else momentum_init(g)
        sent, state.momentum[cid] = momentum_update(own, g, self.momentum)
        return {k: started[k] + sent[k] for k in payload}
