"""The server's side of a Flower run: the method's server state, sampling, validation, aggregation.

The `Coordinator` is transport-free (RecordDicts in, RecordDicts out) so it can be driven by the
ServerApp over a real Grid or called directly in a test. Sampling, validation on receipt (the
method's payload schema, with example counts capped at `fl.max_examples`), the combine chain
(robust rules, DP, ...) and the server row are the simulator's own `ServerRuntime`
(fl/server_runtime.py), used through its public methods; the Grid is only the transport.

Every reply is untrusted: no reply can raise out of a round. A bad one is rejected with a reason
code (flower/intake.py, fl/payload.py), counted in the round's server row (`num_rejected`,
`reject_reasons`), and the round goes on with the others, or is skipped by `fl.min_replies`.
"""

from __future__ import annotations

import logging

from flwr.app import RecordDict

from fedlora.config import RunConfig
from fedlora.config.sources import client_tasks, federation_size
from fedlora.fl.checkpoint import Checkpoint, CheckpointError, restore_state, state_fields
from fedlora.fl.combine import RoundContext
from fedlora.fl.federation import Federation
from fedlora.fl.methods import build_method, method_options
from fedlora.fl.payload import PayloadError, encode
from fedlora.fl.server_runtime import ServerRuntime
from fedlora.fl.state import RunState
from fedlora.fl.timer import Timer
from fedlora.flower.intake import (base_version_of, check_identity, informative, merge_rejections, metrics_of,
                                   record_of, seconds)
from fedlora.flower.node import check_supported
from fedlora.flower.wire import RECORD, blob_of, pack
from fedlora.model import load_model, wrap_lora
from fedlora.model.cuma import attach_cuma, cuma_controller
from fedlora.model.lora import adapter_state, init_adapter_state

log = logging.getLogger("fedlora")


def server_model(cfg: RunConfig):
    """The base model with LoRA (for adapter shapes and the initial adapter); the server has no data."""
    model, _ = load_model(cfg.model)
    return wrap_lora(model, cfg.lora, seed=cfg.seed)


class Coordinator:
    """Server state and round bookkeeping of one fedlora run under Flower."""

    def __init__(self, cfg: RunConfig, fed: Federation | None = None):
        self.cfg = cfg
        self.method = build_method(cfg.fl.method, method_options(cfg, cfg.fl.method))
        check_supported(cfg, self.method)
        model = fed.model if fed is not None else server_model(cfg)
        if getattr(self.method, "model_layer", None) == "cuma" and cuma_controller(model) is None:
            # CuMA's experts and routers, drawn as the simulator draws them; the server never runs
            # the model, so no profiles (those are the nodes' data).
            attach_cuma(model, cfg.cuma, seed=cfg.seed)
        initial = {**init_adapter_state(model, cfg.seed),
                   **{k: v for k, v in adapter_state(model).items() if "cuma_" in k}}
        n = self._num_clients = federation_size(cfg)  # once: the property is read per reply
        self.client_task = client_tasks(cfg)
        # The server knows no node's data size: example counts are capped at fl.max_examples.
        self.server = ServerRuntime(cfg, self.method, initial, n, cfg.seed)
        self.state = RunState(server=self.method.init_server(initial),
                              clients=[self.method.init_client(i, initial) for i in range(n)], optimizer=[None] * n)
        self.rows: list[dict] = []
        # FLoRA: each node merges every round's stacked adapter into its own base. The server
        # counts the merges it made and what each node last said it holds, and sends a node that
        # fell behind (not sampled, dropped) the whole delta instead of one stack.
        self.moves_base = self.method.overrides("base_delta")
        self.base_version = 0
        self.node_base = dict.fromkeys(range(n), 0)
        self.node_rejections: list[tuple[int, str]] = []
        """(Flower node id, reason) of replies rejected before they could be tied to a client (bad
        partition-id claims); counted in the next round's server row."""

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def sample(self, round_index: int) -> list[int]:
        return self.server.sample(round_index)

    def evaluate_now(self, round_index: int) -> bool:
        every = self.cfg.fl.eval_every
        return round_index == self.cfg.fl.rounds or bool(every and round_index % every == 0)

    # --- train -----------------------------------------------------------------------------
    def train_content(self, round_index: int, cid: int) -> RecordDict:
        return RecordDict({RECORD: pack(self.method.download(self.state.server, cid),
                                        **{"server-round": round_index}, **self._base_fields(cid, True))})

    def _base_fields(self, cid: int, stack_in_payload: bool) -> dict:
        """What node `cid` needs to hold base version `base_version` (methods with a base delta):
        nothing, the last stack (unless the payload is that stack already), or the whole delta."""
        if not self.moves_base:
            return {}
        fields = {"base-version": self.base_version}
        held = self.node_base.get(cid, 0)
        if held == self.base_version or (stack_in_payload and held == self.base_version - 1):
            return fields
        if held == self.base_version - 1:
            fields["base-stack"] = encode(self.method.download(self.state.server, cid))
        else:
            fields["base-full"] = encode({f"{m}.delta": d for m, d in
                                          self.method.base_delta(self.state.server).items()})
        return fields

    def _note_base(self, cid: int, record) -> None:
        if self.moves_base:
            version = base_version_of(record, self.base_version)
            if version is not None:
                self.node_base[cid] = version

    def broadcast_content(self, round_index: int) -> RecordDict | None:
        """One message for every client, when this round samples all of them and every client's
        download is the same bytes (then the replies can tell the server who is who); else None."""
        if self.sample(round_index) != list(range(self.num_clients)):
            return None
        contents = [self.train_content(round_index, cid) for cid in range(self.num_clients)]
        if len({blob_of(c[RECORD]) for c in contents}) != 1:
            return None
        return contents[0]

    def absorb_train(self, round_index: int, sampled: list[int], replies: dict[int, RecordDict]) -> list[dict]:
        """Validate each reply (`_receive`), combine, return the round's rows. A sampled client with no
        reply (node gone, timed out, or its ClientApp failed) is 'dropped'."""
        timer, updates, rows, accepted = Timer(), [], [], []
        for cid in sorted(replies):  # the simulator's order: the float sums match bitwise
            update, row = self._receive(round_index, cid, replies[cid], timer)
            if update is not None:
                updates.append(update)
                accepted.append(replies[cid][RECORD])
            rows.append(row)
        ctx = RoundContext(round_index, self.state.server, self.method, self.server.streams, timer, sampled, rows)
        skip = self.server.combine_round(self.state, updates, ctx)
        if skip is None:
            self.base_version += self.moves_base
        self.state.round = round_index
        server = self.server.server_row(self.state, sampled, rows, ctx, skip)
        server["dropped"] = [cid for cid in sampled if cid not in replies]
        merge_rejections(server, "rejected_nodes", self.node_rejections)
        self.node_rejections = []
        # Node-side seconds (slowest node): local training; preparing model and data in the
        # ClientApp process (per message under Flower's subprocess isolation; 0 when reused); the
        # process's age when the message reached fedlora (imports and Flower's start-up).
        for key, name in (("train-seconds", "time_node_train"), ("prepare-seconds", "time_node_prepare"),
                          ("process-seconds", "time_node_process")):
            timer.seconds[name[5:]] = max((seconds(rec, key) for rec in accepted), default=0.0)
        rows.append({**server, **timer.row()})
        return rows

    def _receive(self, round_index: int, cid: int, content: RecordDict, timer) -> tuple:
        """(update or None, the client's row). The reply's record, its claim and base version are
        checked here (flower/intake.py), then the payload with the method's schema
        (`ServerRuntime.receive`: size cap from the schema, declared names, shapes and dtypes before
        any tensor is read, metadata, round, sender, example count in [1, fl.max_examples], finite)."""
        row: dict = {"client": cid}
        try:
            record = record_of(content)
            # Scalars beside the payload are informative only; a reply without them still counts.
            row.update(informative(record))
            check_identity(record, cid, self.num_clients)
            self._note_base(cid, record)
            return self.server.receive(cid, blob_of(record), 0, row, timer, round_index)
        except PayloadError as exc:
            reason = exc.reason
            log.warning("round %s: reply from client %s rejected: %s", round_index, cid, exc)
        except Exception:  # a bug in validation must not let one node's bytes end everyone's run
            reason = "error"
            log.exception("round %s: validating the reply from client %s failed", round_index, cid)
        row.update({"rejected": True, "reject_reason": reason})
        return None, row

    # --- evaluate --------------------------------------------------------------------------
    def evaluate_content(self, cid: int) -> RecordDict:
        """The adapter client `cid` is scored with: the global one, or (personal methods) what it
        downloads, which the node combines with its own state."""
        adapter = (self.method.download(self.state.server, cid) if self.method.personalized
                   else self.method.global_adapter(self.state.server))
        return RecordDict({RECORD: pack(adapter, **self._base_fields(cid, False))})

    def absorb_eval(self, scored: dict[int, RecordDict], server_row: dict) -> list[dict]:
        """The test rows of the evaluate replies that pass (flower/intake.py); the others are listed
        in the round's server row as `eval_rejected` and counted in `num_rejected` and `reject_reasons`."""
        rows, rejected = [], []
        for cid in sorted(scored):
            try:
                record = record_of(scored[cid])
                check_identity(record, cid, self.num_clients)
                self._note_base(cid, record)
                rows.append({"client": cid, "split": "test", **metrics_of(record)})
            except PayloadError as exc:
                log.warning("evaluate: reply from client %s rejected: %s", cid, exc)
                rejected.append((cid, exc.reason))
        merge_rejections(server_row, "eval_rejected", rejected)
        return rows

    # --- checkpoint, resume and the run's report (flower/rundir.py) -------------------------
    def checkpoint_fields(self) -> dict:
        return state_fields(self.state)

    def checkpoint_info(self) -> dict:
        """Who wrote a checkpoint (checked on resume), and the server's count of FLoRA merges."""
        return {"method": self.method.name, "seed": self.cfg.seed, "config": self.cfg.to_dict(),
                "flower": {"base_version": self.base_version}}

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue after `ckpt`'s round. Resuming is a new Flower run, whose nodes start with an empty
        `context.state`: a method that keeps personal state there cannot continue, and FLoRA's nodes
        hold no merged base yet (`node_base` stays 0, so each is sent the whole delta)."""
        if self.method.personalized:
            raise CheckpointError(f"{self.method.name!r} cannot resume under Flower: each node's personal "
                                  "state lives in the Flower run's context.state, which a new run starts empty")
        self.state = restore_state(RunState, ckpt.fields)
        self.rows = list(ckpt.rows)
        self.base_version = int((ckpt.info.get("flower") or {}).get("base_version", 0))

    def would_exceed_epsilon(self) -> bool:
        """True when the next round would take epsilon past dp.target_epsilon (the run stops, as in
        the simulator)."""
        dp = self.server.dp
        return dp is not None and dp.would_exceed(self.state.dp, self.state.round, self.cfg.fl.rounds)

    def dp_summary(self) -> dict:
        """{"dp": the privacy report} for summary.json ({} without DP)."""
        dp = self.server.dp
        return {} if dp is None else dp.summary(self.state.dp, stopped_early=self.state.round < self.cfg.fl.rounds)


def merge_round_rows(train_rows: list[dict], eval_rows: list[dict], round_index: int, method: str) -> list[dict]:
    """One list of rows like the simulator's: a client's training numbers and test scores share a row."""
    server = [r for r in train_rows if r["client"] == "server"]
    by_client = {r["client"]: r for r in train_rows if r["client"] != "server"}
    for er in eval_rows:
        er.update({k: v for k, v in by_client.pop(er["client"], {}).items() if k != "client"})
    rows = list(by_client.values()) + eval_rows + server
    for row in rows:
        row.update({"round": round_index, "method": method})
    return rows
