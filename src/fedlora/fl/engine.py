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
from pathlib import Path

import numpy as np
import torch

from fedlora.fl.federation import Federation
from fedlora.fl.methods import ClientUpdate, Method, build_method, method_options
from fedlora.fl.payload import PayloadError, decode, encode, spec_of
from fedlora.fl.checkpoint import save_checkpoint, state_fields
from fedlora.fl.faults import ClientFaults
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
    stale: list[dict] | None = None
    """Stragglers' updates waiting for the next round (fl.straggler_policy=stale; fl/faults.py)."""
    dp: dict | None = None
    """DP-FedAvg's clip norm and accountant history (`fl/dp.py`, JSON-serializable) when dp is on."""
    synthetic: dict | None = None
    """Concordia's per-client generators and scorers and the shared scorer ensemble (fl/concordia.py)."""


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


class Simulator(RobustRound, ClientFaults):
    """Runs one method on a prepared `Federation`.

    With `checkpoint_dir`, an atomic checkpoint of the run state and the rows so far is written
    after every round (fl/checkpoint.py); `run(state, rows)` continues from one.

    >>> result = Simulator(fed, "fedit").run()          # doctest: +SKIP
    """

    serverless: bool = False
    """True in `GossipSimulator`, which runs the decentralized methods."""

    def __init__(self, fed: Federation, method: str | Method, seed: int | None = None,
                 on_round: Callable[[int, list[dict]], None] | None = None, progress: bool = False,
                 checkpoint_dir: str | Path | None = None):
        self.fed = fed
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.cfg = fed.cfg
        self.method = method if isinstance(method, Method) else build_method(method, method_options(self.cfg, method))
        if self.method.decentralized and not self.serverless:
            raise ValueError(f"method {self.method.name!r} is decentralized: run it with fedlora.fl.gossip."
                             "GossipSimulator (experiment.run_method picks it)")
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
        with timer("serialize"):
            down_blob = encode(self.method.download(state.server, cid))
            received, _ = decode(down_blob)
        payload, row = self.local_round(state, cid, round_index, received, timer)
        row["bytes_down"] = len(down_blob) if received else 0
        return self.receive(cid, payload, len(self.train_sets[cid]), row, timer, round_index=round_index)

    def local_round(self, state: RunState, cid: int, round_index: int, received: dict,
                    timer: _Timer) -> tuple[dict, dict]:
        """What client `cid` does with what it `received`: start, train, build its payload.

        Returns (payload, row); only `state.clients[cid]`, `state.optimizer[cid]` and
        `state.momentum[cid]` are read and updated, so a Flower ClientApp runs this same step.
        """
        fed, method, model = self.fed, self.method, self.fed.model
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
            params = set_trainable(model, method.train_mask_at(round_index))
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
                sample_weights=self.sample_weights_for(cid),
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
        return payload, {"client": cid, "train_loss": result.loss, "local_steps": result.steps}

    def sample_weights_for(self, cid: int) -> np.ndarray | None:
        """Per-row weights of client `cid`'s training rows this round (None: uniform). Concordia
        (fl/concordia.py) sets them from the client's utility scorer."""
        return None

    def receive(self, cid: int, payload: dict | bytes, num_examples: int, row: dict,
                timer: _Timer, expected: dict | None = None,
                round_index: int | None = None) -> tuple[ClientUpdate | None, dict]:
        """Encode what client `cid` sends (bytes are sent as they are), decode and validate it as the
        server does (`payload.decode`: size, keys, shapes, dtypes, finite values, and the metadata's
        round and sender when `round_index` is given). A rejected payload gives
        (None, row with 'rejected': True and 'reject_reason': PayloadError.reason)."""
        with timer("serialize"):
            up_blob = payload if isinstance(payload, (bytes, bytearray)) else encode(
                payload, {"num_examples": num_examples}, round_index=round_index, client_id=cid)
            row["bytes_up"] = len(up_blob) if payload else 0
            try:
                tensors, meta = decode(up_blob, expected=spec_of(payload) if expected is None else expected,
                                       expected_round=round_index, expected_sender=cid,
                                       require_meta=("num_examples",))
            except PayloadError as exc:
                log.warning("round %s: payload from client %s rejected: %s", round_index, cid, exc)
                row.update({"rejected": True, "reject_reason": exc.reason})
                return None, row
        return ClientUpdate(cid, tensors, int(meta["num_examples"])), row

    @staticmethod
    def rejections(rows: list[dict]) -> dict:
        """The server row's rejection counts: who, how many, and how many per reason code."""
        rejected = [row for row in rows if row.get("rejected")]
        reasons: dict[str, int] = defaultdict(int)
        for row in rejected:
            reasons[row.get("reject_reason", "invalid")] += 1
        return {"rejected": [row["client"] for row in rejected], "num_rejected": len(rejected),
                "reject_reasons": dict(sorted(reasons.items()))}

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
            if global_adapter is not None and fed.shifted_test is not None:  # data.shift_column
                load_adapter_state(model, global_adapter)
                rows.append({"client": "shifted", "split": "shifted_test",
                             **evaluate(model, fed.shifted_test, fed.pad_id, bs)})
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
        faults = self._draw_faults(sampled, r)
        updates, rows, late = [], [], []
        for cid in sampled:
            if self._attacker(cid) or cid in faults.dropped:
                continue  # attackers send after the honest clients, from their updates
            update, row = self._safe_client_round(state, cid, r, timer)
            if self.method.pooled:
                row["client"] = "pooled"  # the virtual client holding everyone's rows
            if update is not None and cid in faults.late:
                row["late"] = True
                late.append(cid)
                self._hold_late(state, update, r)  # dropped, or buffered for the next round
                update = None
            updates.append(update)
            rows.append(row)
        attackers = [cid for cid in sampled if self._attacker(cid) and cid not in faults.dropped]
        if attackers:
            byz_updates, byz_rows = self._attack_round(state, attackers, [u for u in updates if u is not None],
                                                       r, timer)
            updates += byz_updates
            rows += byz_rows
        updates = [u for u in updates if u is not None]
        stale = self._take_stale(state, r, updates)
        updates += stale
        needed = 1 if self.method.pooled else self.cfg.fl.min_replies
        with timer("aggregate"):
            if len(updates) >= needed:
                state.server = self._aggregate(state, updates, r)
            else:
                log.warning("round %d skipped: %d valid replies < fl.min_replies=%d; the server state is "
                            "unchanged", r, len(updates), needed)
        self._merge_base(state.server, timer)  # evaluation sees this round's merged update
        self._sync_mixing(state.server)  # and this round's tree, when one was just built
        server = {"client": "server", "sampled": sampled,
                  "bytes_up": sum(row["bytes_up"] for row in rows),
                  "bytes_down": sum(row["bytes_down"] for row in rows)}
        server.update(self.rejections(rows))  # every method, robust or not
        server.update({"replies": len(updates), "skipped": len(updates) < needed, "dropped": faults.dropped,
                       "late": late, "stale_applied": [u.client_id for u in stale],
                       "failed": [row["client"] for row in rows if row.get("failed")]})
        if self.robust_on:
            server["byzantine_sampled"] = [c for c in sampled if c in self.byzantine]
        server.update(self.dp_metrics(state))  # epsilon so far, when dp is on (fl/dp.py)
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

    def run(self, state: RunState | None = None, rows: list[dict] | None = None) -> RunResult:
        """Rounds until fl.rounds; from `state` and its `rows` so far when resuming a checkpoint."""
        state = state or self.initial_state()
        result = RunResult(self.method.name, self.method.personalized, rows=list(rows or []), state=state)
        try:
            while state.round < self.cfg.fl.rounds:
                if self._dp_stop(state):  # the next round would pass dp.target_epsilon
                    break
                new_rows = self.run_round(state)
                result.rows.extend(new_rows)
                if self.on_round is not None:
                    self.on_round(state.round, new_rows)
                if self.checkpoint_dir is not None:
                    self.save_checkpoint(state, result.rows)
        finally:
            detach_mixing(self.fed.model)  # the shared model is plain PEFT again for what comes next
        return result

    def save_extras(self, result: RunResult, folder: Path) -> list[Path]:
        """Files a simulator adds to the run directory after the run (Concordia: table quality)."""
        return []

    def save_checkpoint(self, state: RunState, rows: list[dict]) -> Path:
        """The state after `state.round`, the rows so far, and what wrote them (checked on resume)."""
        info = {"method": self.method.name, "seed": self.seed, "config": self.cfg.to_dict()}
        return save_checkpoint(self.checkpoint_dir, state.round, state_fields(state), rows, info,
                               keep=self.cfg.fl.keep_checkpoints)

    def _sync_mixing(self, server: dict) -> None:
        """Attach (or drop) the mixing layer on the blocks the method asks for (FedTreeLoRA)."""
        layers = self.method.mixing_layers(server)
        if layers != mixed_layers(self.fed.model):
            if layers:
                attach_mixing(self.fed.model, layers)
            else:
                detach_mixing(self.fed.model)
