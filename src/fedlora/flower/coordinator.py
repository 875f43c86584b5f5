"""The server's side of a Flower run: the method's server state, sampling, validation, aggregation.

The `Coordinator` is transport-free (RecordDicts in, RecordDicts out) so it can be driven by the
ServerApp over a real Grid or called directly in a test. It wraps a data-less `Simulator` over
the same base model, so sampling (`sample_clients`), validation on receipt (`receive`: size,
names, shapes, dtype, finite values), the robust chain (`_aggregate`) and the metrics rows are
the simulator's own code, not a copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import RecordDict
from safetensors.torch import save_file

from fedlora.config import RunConfig
from fedlora.fl.engine import RunState, Simulator, _Timer
from fedlora.fl.federation import Federation
from fedlora.fl.methods import build_method, method_options
from fedlora.fl.payload import encode, spec_of
from fedlora.flower.node import check_supported
from fedlora.flower.wire import RECORD, blob_of, pack
from fedlora.model import load_model, wrap_lora
from fedlora.model.lora import init_adapter_state

log = logging.getLogger("fedlora")


def server_federation(cfg: RunConfig) -> Federation:
    """The base model (for adapter shapes and the initial adapter) and no data: the server has none."""
    model, tokenizer = load_model(cfg.model)
    model = wrap_lora(model, cfg.lora, seed=cfg.seed)
    placeholders = [SimpleNamespace(train=None) for _ in range(cfg.partition.num_clients)]
    return Federation(cfg, model, tokenizer, None, None, placeholders, None, np.zeros(0, dtype=int))


class Coordinator:
    """Server state and round bookkeeping of one fedlora run under Flower."""

    def __init__(self, cfg: RunConfig, fed: Federation | None = None):
        self.cfg = cfg
        self.method = build_method(cfg.fl.method, method_options(cfg, cfg.fl.method))
        check_supported(cfg, self.method)
        self.sim = Simulator(fed or server_federation(cfg), self.method, seed=cfg.seed)
        self.state: RunState = self.sim.initial_state()
        initial = init_adapter_state(self.sim.fed.model, self.sim.seed)
        # What each client must upload: the method's payload for an adapter of the model's shape.
        self.expected = {cid: spec_of(self.method.upload(initial, self.method.init_client(cid, initial))[0])
                         for cid in range(cfg.partition.num_clients)}
        self.rows: list[dict] = []
        # FLoRA: each node merges every round's stacked adapter into its own base. The server
        # counts the merges it made and what each node last said it holds, and sends a node that
        # fell behind (not sampled, dropped) the whole delta instead of one stack.
        self.moves_base = self.method.overrides("base_delta")
        self.base_version = 0
        self.node_base = dict.fromkeys(range(cfg.partition.num_clients), 0)

    @property
    def num_clients(self) -> int:
        return self.cfg.partition.num_clients

    def sample(self, round_index: int) -> list[int]:
        return self.sim.sample_clients(round_index)

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
        if self.moves_base and "base-version" in record:
            self.node_base[cid] = int(record["base-version"])

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
        """Validate each reply like the simulator's server (`Simulator.receive`: size, names,
        shapes, dtype, finite values, round and sender), aggregate, and return the round's rows.
        A sampled client with no reply (node gone, timed out, or its ClientApp failed) is 'dropped'."""
        timer, updates, rows = _Timer(), [], []
        for cid in sorted(replies):  # the simulator's order: the float sums match bitwise
            rec = replies[cid][RECORD]
            self._note_base(cid, rec)
            # Scalars beside the payload are informative only; a reply without them still counts.
            row = {"client": cid, "train_loss": rec.get("train-loss", float("nan")),
                   "local_steps": rec.get("local-steps", 0), "bytes_down": rec.get("bytes-down", 0)}
            update, row = self.sim.receive(cid, blob_of(rec), 0, row, timer, expected=self.expected[cid],
                                           round_index=round_index)
            updates.append(update)
            rows.append(row)
        dropped = [cid for cid in sampled if cid not in replies]
        updates = [u for u in updates if u is not None]
        needed = max(1, int(getattr(self.cfg.fl, "min_replies", 1)))
        with timer("aggregate"):
            if len(updates) >= needed:
                self.state.server = self.sim._aggregate(self.state, updates, round_index)
                self.base_version += self.moves_base
            else:
                log.warning("round %d skipped: %d valid replies < %d; the server state is unchanged",
                            round_index, len(updates), needed)
        self.state.round = round_index
        server = {"client": "server", "sampled": sampled, "bytes_up": sum(r["bytes_up"] for r in rows),
                  "bytes_down": sum(r["bytes_down"] for r in rows)}
        server.update(self.sim.rejections(rows))
        server.update({"replies": len(updates), "skipped": len(updates) < needed, "dropped": dropped})
        if hasattr(self.sim, "dp_metrics"):  # DP-FedAvg runs in `_aggregate`, on the server, as here
            server.update(self.sim.dp_metrics(self.state))
        # Node-side seconds (slowest node): local training; preparing model and data in the
        # ClientApp process (per message under Flower's subprocess isolation; 0 when reused); the
        # process's age when the message reached fedlora (imports and Flower's start-up).
        for key, name in (("train-seconds", "time_node_train"), ("prepare-seconds", "time_node_prepare"),
                          ("process-seconds", "time_node_process")):
            timer.seconds[name[5:]] = max((float(r[RECORD].get(key, 0.0)) for r in replies.values()), default=0.0)
        rows.append({**server, **{f"time_{k}": round(v, 4) for k, v in timer.seconds.items()}})
        return rows

    # --- evaluate --------------------------------------------------------------------------
    def evaluate_content(self, cid: int) -> RecordDict:
        """The adapter client `cid` is scored with: the global one, or (personal methods) what it
        downloads, which the node combines with its own state."""
        adapter = (self.method.download(self.state.server, cid) if self.method.personalized
                   else self.method.global_adapter(self.state.server))
        return RecordDict({RECORD: pack(adapter, **self._base_fields(cid, False))})

    def eval_row(self, cid: int, reply: RecordDict) -> dict:
        self._note_base(cid, reply[RECORD])
        return {"client": cid, "split": "test", **json.loads(reply[RECORD]["metrics"])}

    # --- outputs ---------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        adapter = self.method.global_adapter(self.state.server)
        if adapter is not None:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / "global_adapter.safetensors"))
        tmp = folder / "metrics.jsonl.tmp"  # renamed when complete: its presence means 'done'
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows), encoding="utf-8")
        tmp.replace(folder / "metrics.jsonl")


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
