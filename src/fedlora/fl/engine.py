"""The in-process simulator: one frozen base model, many clients' adapters, real payload bytes.

Per round: sample clients; for each, encode what the server sends (safetensors; bytes counted),
copy the client's starting adapter into the shared model, run the local loop, encode what the
client sends, decode and validate it as a server would; then aggregate, and evaluate on schedule.
Every random choice comes from generators derived from (seed, round, client), so the same config
gives the same metrics, and a client's randomness does not depend on which others were sampled.

Byzantine clients and robust aggregation live in `fl/robust_round.py` (a mixin of Simulator).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.fl.federation import Federation
from fedlora.fl.methods import ClientUpdate, Method, build_method, method_options
from fedlora.fl.payload import PayloadError, decode, encode, spec_of
from fedlora.fl.robust_round import RobustRound
from fedlora.model.lora import (adapter_parameters, base_weights, init_adapter_state, load_adapter_state,
                                rank_scaling, set_base_weights, set_trainable, zero_pad_rank)
from fedlora.model.mixing import attach_mixing, detach_mixing, mixed_layers
from fedlora.train.batches import EncodedExamples
from fedlora.train.evaluate import evaluate
from fedlora.train.local import local_train, num_local_steps

log = logging.getLogger("fedlora")


@dataclass
class RunState:
    """Everything a run carries from round to round (what a checkpoint would save)."""

    server: dict
    clients: list[dict]
    optimizer: list[dict | None]
    round: int = 0
    momentum: list[dict | None] | None = None
    """Per-client worker-momentum state (`fl/momentum.py`) when robust.momentum is set."""
    aggregator: dict | None = None
    """The robust chain's state (e.g. centered clipping's previous output) when one is set."""


@dataclass
class RunResult:
    method: str
    personalized: bool
    rows: list[dict] = field(default_factory=list)
    """metrics.jsonl rows: one per (round, client), per (round, 'global'), per (round, 'server')."""
    state: RunState | None = None

    def final(self, client: str | int) -> dict | None:
        rows = [r for r in self.rows if r["client"] == client and "accuracy" in r]
        return rows[-1] if rows else None


class _Timer:
    """Accumulates wall-clock seconds per phase of a round (train, swap, serialize, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] += time.perf_counter() - self.start

        return _Span()


def _client_seed(seed: int, round_index: int, client_id: int) -> list[int]:
    return [seed, round_index, client_id]


def _fresh_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of a client's fresh adapter in a round (methods with `fresh_each_round`)."""
    return int(np.random.default_rng([*_client_seed(seed, round_index, client_id), 1]).integers(2**62))


def _pooled(fed: Federation) -> EncodedExamples:
    """Every client's training rows in one set (the centralized reference only)."""
    parts = [c.train for c in fed.clients]
    ids = [p for part in parts for p in part.prompt_ids]
    labels = np.concatenate([part.labels for part in parts])
    return EncodedExamples(ids, labels, parts[0].verbalizer_ids)


class Simulator(RobustRound):
    """Runs one method on a prepared `Federation`.

    >>> result = Simulator(fed, "fedit").run()          # doctest: +SKIP
    """

    def __init__(self, fed: Federation, method: str | Method, seed: int | None = None,
                 on_round: Callable[[int, list[dict]], None] | None = None, progress: bool = False):
        self.fed = fed
        self.cfg = fed.cfg
        self.method = method if isinstance(method, Method) else build_method(method, method_options(self.cfg, method))
        self.seed = self.cfg.seed if seed is None else seed
        self.on_round = on_round
        self.progress = progress
        pooled = self.method.pooled
        self._base_backup: dict[str, torch.Tensor] | None = None  # W0 of merged layers, during a round
        self.train_sets = [_pooled(fed)] if pooled else [c.train for c in fed.clients]
        self._setup_robust()

    @property
    def num_sampled(self) -> int:
        return 1 if self.method.pooled else max(1, round(self.cfg.fl.client_fraction * len(self.train_sets)))

    # --- set-up ----------------------------------------------------------------------------
    def initial_state(self) -> RunState:
        initial = init_adapter_state(self.fed.model, self.seed)
        n = len(self.train_sets)
        return RunState(
            server=self.method.init_server(initial),
            clients=[self.method.init_client(i, initial) for i in range(n)],
            optimizer=[None] * n,
            momentum=[None] * n if self.robust_on and self.cfg.robust.momentum is not None else None,
        )

    def sample_clients(self, round_index: int) -> list[int]:
        n = len(self.train_sets)
        m = self.num_sampled
        rng = np.random.default_rng([self.seed, round_index, 10**6])
        return sorted(rng.choice(n, size=m, replace=False).tolist())

    # --- one round -------------------------------------------------------------------------
    def client_round(self, state: RunState, cid: int, round_index: int, timer: _Timer) -> tuple[ClientUpdate, dict]:
        fed, method, model = self.fed, self.method, self.fed.model
        with timer("serialize"):
            down_blob = encode(method.download(state.server, cid))
            received, _ = decode(down_blob)
        fresh = method.fresh_each_round
        with timer("swap"):
            if fresh:  # FLoRA: a new LoRA on the current base, A seeded by (seed, round, client), B = 0
                start = init_adapter_state(model, _fresh_seed(self.seed, round_index, cid))
            else:
                start = method.start_local(received, state.clients[cid])
            rank = method.client_rank(cid)  # None for most methods: the model's rank r
            if rank is not None:
                start = zero_pad_rank(start, rank)
            load_adapter_state(model, start)
            params = set_trainable(model, method.train_mask)
        data = self.train_sets[cid]
        steps = num_local_steps(self.cfg.train, len(data))
        if method.pooled:
            steps *= max(1, round(self.cfg.fl.client_fraction * fed.num_clients))
        live = adapter_parameters(model)
        extra = method.extra_loss(live, received)
        with timer("train"), torch.random.fork_rng(devices=[]), rank_scaling(model, rank):
            # LoRA dropout draws from torch's global generator; fork it so runs stay independent.
            torch.manual_seed(int(np.random.default_rng(_client_seed(self.seed, round_index, cid)).integers(2**31)))
            result = local_train(
                model, params, data, self.cfg.train, steps,
                np.random.default_rng(_client_seed(self.seed, round_index, cid)), fed.pad_id,
                optimizer_state=None if fresh else state.optimizer[cid], extra_loss=extra,
                progress=f"round {round_index} client {cid}" if self.progress else None,
            )
        state.optimizer[cid] = result.optimizer_state
        with timer("swap"):
            trained = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in live.items()}
        payload, state.clients[cid] = method.upload(trained, state.clients[cid])
        beta = self.cfg.robust.momentum
        if beta is not None and self.robust_on and cid not in self.byzantine:
            payload = self._with_momentum(state, cid, payload, start, beta)
        row = {"client": cid, "train_loss": result.loss, "local_steps": result.steps,
               "bytes_down": len(down_blob) if received else 0}
        update, row = self.receive(cid, payload, len(data), row, timer)
        return update, row

    def receive(self, cid: int, payload: dict | bytes, num_examples: int, row: dict,
                timer: _Timer, expected: dict | None = None) -> tuple[ClientUpdate | None, dict]:
        """Encode what client `cid` sends (bytes are sent as they are), decode and validate it as the
        server does. A malformed payload is rejected: (None, row with 'rejected': True)."""
        with timer("serialize"):
            up_blob = payload if isinstance(payload, (bytes, bytearray)) else encode(
                payload, {"num_examples": num_examples, "client_id": cid})
            row["bytes_up"] = len(up_blob) if payload else 0
            try:
                tensors, meta = decode(up_blob, expected=spec_of(payload) if expected is None else expected)
                update = ClientUpdate(cid, tensors, int(meta["num_examples"]))
            except (PayloadError, KeyError, TypeError, ValueError) as exc:
                log.warning("round payload from client %s rejected: %s", cid, exc)
                row["rejected"] = True
                return None, row
        return update, row

    def evaluate(self, state: RunState, timer: _Timer) -> list[dict]:
        fed, method, model = self.fed, self.method, self.fed.model
        bs = self.cfg.eval.batch_size
        rows = []
        with timer("eval"):
            global_adapter = method.global_adapter(state.server)
            for cid, client in enumerate(fed.clients):
                adapter = (method.personal_adapter(state.server, state.clients[cid])
                           if method.personalized else global_adapter)
                load_adapter_state(model, adapter)
                rows.append({"client": cid, "split": "test", **evaluate(model, client.test, fed.pad_id, bs)})
            if global_adapter is not None and self.cfg.eval.global_test and len(fed.global_test):
                load_adapter_state(model, global_adapter)
                rows.append({"client": "global", "split": "global_test",
                             **evaluate(model, fed.global_test, fed.pad_id, bs)})
        return rows

    def run_round(self, state: RunState) -> list[dict]:
        """One round. A method with a `base_delta` (FLoRA) trains and is scored on W0 + delta.

        Only the merged layers' W0 is backed up (on CPU, same dtype) and it is copied back when the
        round ends, also on error: the shared model holds W0 bitwise between rounds, so the next
        method in compare() (and every test) sees the original base, and no client ever needs its
        own copy of the base model.
        """
        try:
            return self._round(state)
        finally:
            if self._base_backup is not None:
                set_base_weights(self.fed.model, self._base_backup)
                self._base_backup = None

    def _merge_base(self, server: dict, timer: _Timer) -> None:
        """Set W = W0 + (alpha / r) * delta on the layers the method's base delta names (if any)."""
        delta = self.method.base_delta(server)
        if delta is None:
            return
        with timer("merge"):
            if self._base_backup is None:
                self._base_backup = base_weights(self.fed.model, sorted(delta))
            set_base_weights(self.fed.model, self._base_backup, delta)

    def _round(self, state: RunState) -> list[dict]:
        r = state.round + 1
        timer = _Timer()
        self._merge_base(state.server, timer)
        self._sync_mixing(state.server)
        sampled = [0] if self.method.pooled else self.sample_clients(r)
        updates, rows = [], []
        for cid in sampled:
            if self._attacker(cid):
                continue  # sends after the honest clients, from their updates
            update, row = self.client_round(state, cid, r, timer)
            if self.method.pooled:
                row["client"] = "pooled"  # the virtual client holding everyone's rows
            updates.append(update)
            rows.append(row)
        attackers = [cid for cid in sampled if self._attacker(cid)]
        if attackers:
            byz_updates, byz_rows = self._attack_round(state, attackers, [u for u in updates if u is not None],
                                                       r, timer)
            updates += byz_updates
            rows += byz_rows
        rejected = [row["client"] for row in rows if row.get("rejected")]
        updates = [u for u in updates if u is not None]
        with timer("aggregate"):
            if updates:
                state.server = self._aggregate(state, updates, r)
            else:
                log.warning("round %d: no valid update; the server state is unchanged", r)
        self._merge_base(state.server, timer)  # evaluation sees this round's merged update
        self._sync_mixing(state.server)  # and this round's tree, when one was just built
        server = {"client": "server", "sampled": sampled,
                  "bytes_up": sum(row["bytes_up"] for row in rows),
                  "bytes_down": sum(row["bytes_down"] for row in rows)}
        if self.robust_on:
            server.update({"byzantine_sampled": [c for c in sampled if c in self.byzantine],
                           "rejected": rejected, "num_rejected": len(rejected)})
        every = self.cfg.fl.eval_every
        if r == self.cfg.fl.rounds or (every and r % every == 0):
            # A client's training numbers and its test scores share one row.
            train_by_client = {row["client"]: row for row in rows}
            eval_rows = self.evaluate(state, timer)
            for er in eval_rows:
                er.update({k: v for k, v in train_by_client.pop(er["client"], {}).items() if k != "client"})
            rows = list(train_by_client.values()) + eval_rows
        rows.append({**server, **{f"time_{k}": round(v, 4) for k, v in timer.seconds.items()}})
        state.round = r
        for row in rows:
            row.update({"round": r, "method": self.method.name})
            if row["client"] in self.byzantine:
                row["byzantine"] = True
        return rows

    def run(self, state: RunState | None = None) -> RunResult:
        state = state or self.initial_state()
        result = RunResult(self.method.name, self.method.personalized, state=state)
        try:
            while state.round < self.cfg.fl.rounds:
                rows = self.run_round(state)
                result.rows.extend(rows)
                if self.on_round is not None:
                    self.on_round(state.round, rows)
        finally:
            detach_mixing(self.fed.model)  # the shared model is plain PEFT again for what comes next
        return result

    def _sync_mixing(self, server: dict) -> None:
        """Attach (or drop) the mixing layer on the blocks the method asks for (FedTreeLoRA)."""
        layers = self.method.mixing_layers(server)
        if layers != mixed_layers(self.fed.model):
            if layers:
                attach_mixing(self.fed.model, layers)
            else:
                detach_mixing(self.fed.model)
