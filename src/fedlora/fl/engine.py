"""The in-process simulator: one frozen base model, many clients' adapters, real payload bytes.

One round (`Simulator._round`), on the shared runtimes:

    sampled  = server.sample(r)                                    # fl/server_runtime.py
    faults   = dropouts and stragglers among them                  # fl/faults.py (simulation only)
    for each sampled client that is on line and not an update attacker:
        received = decode(encode(method.download(server, i) + rule's extras))   # bytes down
        payload  = rule.client_round(...)  ->  ClientRuntime.train             # fl/client_runtime.py
        update   = server.receive(encode(payload))                 # schema-validated, bytes up
    server state = combine(updates)                                # fl/combine.py: stale, side
                                                                   # channels, attacks, dp|robust,
                                                                   # then the method's aggregate
    rows: one per client, 'global', 'server'; evaluation on schedule

The in-process transport (encode, decode) is the only part a Flower run replaces. Every random
choice comes from the named streams of `fl/streams.py`, so the same config gives the same
metrics, and a client's randomness does not depend on which others were sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedlora.fl.checkpoint import save_checkpoint, state_fields
from fedlora.fl.client_runtime import ClientRuntime
from fedlora.fl.combine import RoundContext, download_reference
from fedlora.fl.cuma_setup import sync_cuma
from fedlora.fl.faults import RoundFaults, draw_faults, guarded
from fedlora.fl.federation import Federation
from fedlora.fl.generation import write_samples
from fedlora.fl.methods import ClientUpdate, Method, build_method, method_options
from fedlora.fl.payload import decode, encode
from fedlora.fl.robust_round import flip_labels_of
from fedlora.fl.rules import ClientRule
from fedlora.fl.scoring import make_scorer
from fedlora.fl.server_runtime import ServerRuntime
from fedlora.fl.sources import global_tests, tag_clients, tag_tasks
from fedlora.fl.state import RunResult, RunState
from fedlora.fl.streams import Streams
from fedlora.fl.timer import Timer
from fedlora.model.cuma import detach_cuma
from fedlora.model.lora import (
    base_weights,
    init_adapter_state,
    load_adapter_state,
    set_base_weights,
)
from fedlora.model.mixing import attach_mixing, detach_mixing, mixed_layers
from fedlora.train.batches import EncodedExamples
from fedlora.train.gen_encode import GenerationExamples

log = logging.getLogger("fedlora")


def _pooled(fed: Federation) -> EncodedExamples:
    """Every client's training rows in one set (the centralized reference only)."""
    parts = [c.train for c in fed.clients]
    if isinstance(parts[0], GenerationExamples):
        return GenerationExamples.concat(parts)
    ids = [p for part in parts for p in part.prompt_ids]
    labels = np.concatenate([part.labels for part in parts])
    return EncodedExamples(ids, labels, parts[0].verbalizer_ids)


class Simulator:
    """Runs one method on a prepared `Federation`, with an optional client rule (Concordia).

    With `checkpoint_dir`, an atomic checkpoint of the run state and the rows so far is written
    after every round (fl/checkpoint.py); `run(state, rows)` continues from one.

    >>> result = Simulator(fed, "fedit").run()          # doctest: +SKIP
    """

    serverless: bool = False
    """True in `GossipSimulator`, which runs the decentralized methods."""

    def __init__(self, fed: Federation, method: str | Method, seed: int | None = None,
                 on_round: Callable[[int, list[dict]], None] | None = None, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, rule: ClientRule | None = None):
        self.fed, self.cfg = fed, fed.cfg
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.method = method if isinstance(method, Method) else build_method(method, method_options(self.cfg, method))
        self.rule = rule or ClientRule()
        self.rule.check(self.method)
        if self.method.decentralized and not self.serverless:
            raise ValueError(f"method {self.method.name!r} is decentralized: run it with fedlora.fl.gossip."
                             "GossipSimulator (experiment.run_method picks it)")
        self.seed = self.cfg.seed if seed is None else seed
        self.streams = Streams(self.seed)
        self.on_round, self.progress = on_round, progress
        self._base_backup: dict[str, torch.Tensor] | None = None  # W0 of merged layers, during a round
        self.train_sets = [_pooled(fed)] if self.method.pooled else [c.train for c in fed.clients]
        # CuMA's experts and routers join the initial adapter (fl/cuma_setup.py; {} for other methods).
        self._layer_initial = sync_cuma(fed, self.method, self.seed)
        initial = {**init_adapter_state(fed.model, self.seed), **self._layer_initial}
        # A client's declared data size caps the example count it may report (its training rows now:
        # a rule such as Concordia replaces them each round).
        self.server = ServerRuntime(self.cfg, self.method, initial, len(self.train_sets), self.seed,
                                    declared=lambda cid: len(self.train_sets[cid]), rule=self.rule)
        self.byzantine, self.robust_on = self.server.byzantine, self.server.robust_on
        self.label_flippers = self.byzantine if self.robust_on and self.cfg.robust.label_flip else []
        steps_factor = max(1, round(self.cfg.fl.client_fraction * fed.num_clients)) if self.method.pooled else 1
        momentum = self.cfg.robust.momentum if self.robust_on else None
        self.client = ClientRuntime(fed.model, self.method, self.cfg, self.streams, fed.pad_id,
                                    momentum=momentum, progress=progress, steps_factor=steps_factor)
        self.rule.bind(self)

    @property
    def num_sampled(self) -> int:
        return self.server.num_sampled

    @property
    def dp(self):
        """The DP transform's setup (z, z_update, m, q, delta, sampling), or None without DP."""
        return None if self.server.dp is None else self.server.dp.setup

    # --- set-up ----------------------------------------------------------------------------
    def initial_state(self) -> RunState:
        initial = {**init_adapter_state(self.fed.model, self.seed), **self._layer_initial}
        n = len(self.train_sets)
        state = RunState(
            server=self.method.init_server(initial),
            clients=[self.method.init_client(i, initial) for i in range(n)],
            optimizer=[None] * n,
            momentum=[None] * n if self.client.momentum is not None else None,
        )
        self.rule.initial_state(state)
        return state

    def sample_clients(self, round_index: int) -> list[int]:
        return self.server.sample(round_index)

    # --- one client, over the in-process transport -------------------------------------------
    def client_round(self, state: RunState, cid: int, round_index: int, timer: Timer) -> tuple[ClientUpdate, dict]:
        with timer("serialize"):
            down = {**self.method.download(state.server, cid), **self.rule.download_extra(state)}
            down_blob = encode(down)
            received, _ = decode(down_blob)
        payload, row = self.rule.client_round(state, cid, round_index, received, timer)
        row["bytes_down"] = len(down_blob) if received else 0
        return self.receive(cid, payload, len(self.train_sets[cid]), row, timer, round_index=round_index)

    def local_round(self, state: RunState, cid: int, round_index: int, received: dict,
                    timer: Timer) -> tuple[dict, dict]:
        """Client `cid`'s training step on its own rows (the client runtime; a rule may have replaced
        the rows, e.g. Concordia's synthetic ones). A label flipper flips whatever rows it trains on."""
        data = self.train_sets[cid]
        if cid in self.label_flippers:
            data = flip_labels_of(data)
        return self.client.train(state, cid, round_index, received, data, timer,
                                 sample_weights=self.rule.sample_weights(cid))

    def receive(self, cid: int, payload: dict | bytes, num_examples: int, row: dict, timer: Timer,
                round_index: int | None = None) -> tuple[ClientUpdate | None, dict]:
        """Decode and validate what client `cid` sends, as the server does (`ServerRuntime.receive`)."""
        return self.server.receive(cid, payload, num_examples, row, timer, round_index)

    def aggregate(self, state: RunState, updates: list[ClientUpdate], round_index: int) -> dict:
        """The server's combine chain on `updates` (stale, side channels, dp | robust, the method's
        aggregate): the new server state, transform states committed; SkipRound when it cannot."""
        ctx = self._context(state, round_index, Timer(), self.sample_clients(round_index), [], [])
        return self.server.combine(state, updates, ctx)

    def reference(self, server: dict, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` downloads from `server`, in float32 (updates are measured from it)."""
        return download_reference(self.method, server, cid)

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, state: RunState, timer: Timer) -> list[dict]:
        """Each client's adapter (the global one, or its own) on its own test split, calibrated on its
        own validation split (eval.calibration); the global adapter on the global and shifted tests,
        calibrated on `Scorer.global_set` (eval.global_calibration)."""
        fed, method, model = self.fed, self.method, self.fed.model
        scorer = make_scorer(fed)
        rows, under_global = [], []
        with timer("eval"):
            global_adapter = method.global_adapter(state.server)
            for cid, client in enumerate(fed.clients):
                adapter = (method.personal_adapter(state.server, state.clients[cid])
                           if method.personalized else global_adapter)
                load_adapter_state(model, adapter)
                cal = scorer.calibration_set(client.val)
                if cal is not None and not method.personalized:
                    under_global.append(cal)  # already under the global adapter: reused for pooled_val
                rows.append({"client": cid, "split": "test", **scorer.metrics(client.test, cal)})
            extra = [("global", "global_test", fed.global_test if self.cfg.eval.global_test else None),
                     ("shifted", "shifted_test", fed.shifted_test)]  # data.shift_column
            if fed.parts is not None and self.cfg.eval.global_test:  # several sources: one global test per task
                extra = [(name, "global_test", data) for name, data in global_tests(fed)]
            extra = [(name, split, data) for name, split, data in extra if data is not None and len(data)]
            if global_adapter is not None and extra:
                load_adapter_state(model, global_adapter)
                cal = scorer.global_set(under_global)
                for name, split, data in extra:
                    rows.append({"client": name, "split": split, **scorer.metrics(data, cal)})
        self.samples = scorer.samples  # a generation task's sample answers (the latest evaluation)
        return tag_tasks(fed, rows)

    # --- one round ----------------------------------------------------------------------------
    def run_round(self, state: RunState) -> list[dict]:
        """One round. A method with a `base_delta` (FLoRA) trains and is scored on W0 + delta.

        Only the merged layers' W0 is backed up (on CPU, same dtype) and it is copied back when the
        round ends, also on error: the shared model holds W0 bitwise between rounds, so the next
        method in compare() (and every test) sees the original base, and no client ever needs its
        own copy of the base model.
        """
        try:
            rows = self._round(state)
            # several sources: every client row says its task (evaluate() tagged the scored ones)
            return tag_clients(rows, self.fed.client_task) if self.fed.client_task else rows
        finally:
            if self._base_backup is not None:
                set_base_weights(self.fed.model, self._base_backup)
                self._base_backup = None

    def _merge_base(self, server: dict, timer: Timer) -> None:
        """Set W = W0 + (alpha / r) * delta on the layers the method's base delta names (if any)."""
        delta = self.method.base_delta(server)
        if delta is None:
            return
        with timer("merge"):
            if self._base_backup is None:
                self._base_backup = base_weights(self.fed.model, sorted(delta))
            set_base_weights(self.fed.model, self._base_backup, delta)

    def _faults(self, sampled: list[int], round_index: int) -> RoundFaults:
        fl = self.cfg.fl
        if self.method.pooled:
            return RoundFaults()
        return draw_faults(self.seed, round_index, sampled, fl.dropout, fl.deadline, fl.latency)

    def _round(self, state: RunState) -> list[dict]:
        r, timer, server = state.round + 1, Timer(), self.server
        self._merge_base(state.server, timer)
        self._sync_mixing(state.server)
        sampled = self.sample_clients(r)
        faults = self._faults(sampled, r)
        attackers = [c for c in sampled if server.is_attacker(c) and c not in faults.dropped]
        stale = server.combine.get("stale")
        updates, rows, late = [], [], []
        for cid in sampled:
            if cid in attackers or cid in faults.dropped:
                continue  # attackers send after the honest clients, from their updates (combine)
            result, failure = guarded(state, cid, r, lambda cid=cid: self.client_round(state, cid, r, timer))
            update, row = result if failure is None else (None, {**failure, "bytes_up": 0, "bytes_down": 0})
            if self.method.pooled:
                row["client"] = "pooled"  # the virtual client holding everyone's rows
            if update is not None and cid in faults.late:
                row["late"] = True
                late.append(cid)
                if stale is not None:  # buffered for the next round; else dropped
                    state.stale = stale.hold(state.stale, update, r, self.reference(state.server, cid))
                update = None
            if update is not None:
                updates.append(update)
            rows.append(row)
        ctx = self._context(state, r, timer, sampled, rows, attackers)
        skip = server.combine_round(state, updates, ctx)
        self._merge_base(state.server, timer)  # evaluation sees this round's merged update
        self._sync_mixing(state.server)  # and this round's tree, when one was just built
        server_row = server.server_row(state, sampled, rows, ctx, skip)
        server_row.update({"dropped": faults.dropped, "late": late})
        every = self.cfg.fl.eval_every
        if r == self.cfg.fl.rounds or (every and r % every == 0):
            # A client's training numbers and its test scores share one row.
            train_by_client = {row["client"]: row for row in rows}
            eval_rows = self.evaluate(state, timer)
            for er in eval_rows:
                er.update({k: v for k, v in train_by_client.pop(er["client"], {}).items() if k != "client"})
            rows = list(train_by_client.values()) + eval_rows
        rows.append({**server_row, **timer.row()})
        state.round = r
        for row in rows:
            row.update({"round": r, "method": self.method.name})
            if row["client"] in self.byzantine:
                row["byzantine"] = True
        return rows

    def _context(self, state: RunState, r: int, timer: Timer, sampled: list[int], rows: list[dict],
                 attackers: list[int]) -> RoundContext:
        def receive(cid, payload, num_examples, row):
            return self.receive(cid, payload, num_examples, row, timer, round_index=r)

        return RoundContext(r, state.server, self.method, self.streams, timer, sampled, rows, receive=receive,
                            attackers=attackers, declared_examples=lambda cid: len(self.train_sets[cid]))

    def run(self, state: RunState | None = None, rows: list[dict] | None = None) -> RunResult:
        """Rounds until fl.rounds; from `state` and its `rows` so far when resuming a checkpoint."""
        sync_cuma(self.fed, self.method, self.seed, fresh=False)  # re-attached if a run removed it
        state = state or self.initial_state()
        result = RunResult(self.method.name, self.method.personalized, rows=list(rows or []), state=state)
        dp = self.server.dp
        try:
            while state.round < self.cfg.fl.rounds:
                if dp is not None and dp.would_exceed(state.dp, state.round, self.cfg.fl.rounds):
                    break  # the next round would pass dp.target_epsilon
                new_rows = self.run_round(state)
                result.rows.extend(new_rows)
                if self.on_round is not None:
                    self.on_round(state.round, new_rows)
                if self.checkpoint_dir is not None:
                    self.save_checkpoint(state, result.rows)
        finally:
            detach_mixing(self.fed.model)  # the shared model is plain PEFT again for what comes next
            detach_cuma(self.fed.model)
        return result

    # --- what the run reports ------------------------------------------------------------------
    def dp_metrics(self, state: RunState) -> dict:
        """epsilon spent so far at delta ({} without DP)."""
        return {} if self.server.dp is None else self.server.dp.metrics(state.dp)

    def dp_summary(self, state: RunState) -> dict:
        """{"dp": the privacy report} for summary.json ({} without DP)."""
        dp = self.server.dp
        return {} if dp is None else dp.summary(state.dp, stopped_early=state.round < self.cfg.fl.rounds)

    def save_extras(self, result: RunResult, folder: Path) -> list[Path]:
        """Files the client rule adds to the run directory after the run (Concordia: table quality), and
        on a generation task samples.jsonl: the last evaluation's sample answers."""
        paths = self.rule.save_extras(result, folder)
        if getattr(self, "samples", None):
            path = Path(folder) / "samples.jsonl"
            write_samples(path, self.samples, method=self.method.name, round=result.state.round)
            paths = [*paths, path]
        return paths

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
