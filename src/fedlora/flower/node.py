"""One institution's side of a Flower run: its data, its local state, its local round.

A `Node` prepares the base model and this node's data exactly as the simulator does (same config,
same seed, so `partition-id=i` holds the simulator's client i) and runs the simulator's own
`Simulator.local_round`: the same start, trainable mask, local loop, seeds and payload. What the
node keeps between rounds (the method's per-client state, e.g. FedSA-LoRA's B) lives in Flower's
`context.state` as safetensors bytes, so it never leaves the node and survives the per-message
ClientApp processes Flower spawns.

Per process the prepared `Node` is cached: with `--isolation subprocess` (the default) Flower
starts one ClientApp process per message, so the base model is loaded once per message there;
in-process callers (tests, `--isolation process` servers that reuse the process) load it once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.fl.engine import RunState, Simulator, _Timer
from fedlora.fl.federation import prepare
from fedlora.fl.methods import Method, build_method, method_options
from fedlora.fl.payload import decode, encode, spec_of
from fedlora.flower.config import config_to_text, node_selection, run_config_of
from fedlora.flower.wire import PAYLOAD, RECORD, blob_of, check_subset, unpack
from fedlora.model.lora import adapter_parameters, init_adapter_state, load_adapter_state
from fedlora.train.evaluate import evaluate

log = logging.getLogger("fedlora")

STATE_KEY = "fedlora.client-state"
"""context.state key: this node's persistent method state (safetensors bytes)."""

_NODES: dict[tuple[str, str], Node] = {}


class Node:
    """The prepared federation seen from client `cid`, and a simulator to run its local rounds."""

    def __init__(self, cfg: RunConfig, node_config: Mapping[str, object]):
        started = time.perf_counter()
        self.cid, data_cfg = node_selection(node_config, cfg)
        self.cfg = cfg
        self.fed = prepare(data_cfg)
        self.method = build_method(cfg.fl.method, method_options(cfg, cfg.fl.method))
        check_supported(cfg, self.method)
        self.sim = Simulator(self.fed, self.method, seed=cfg.seed)
        n = cfg.partition.num_clients
        if data_cfg is not cfg:  # own table: it is client 0 of a one-client federation
            own = self.fed.clients[0]
            self.sim.train_sets = [own.train if i == self.cid else None for i in range(n)]
            self.splits = own
        else:
            self.splits = self.fed.clients[self.cid]
        self.num_examples = len(self.sim.train_sets[self.cid])
        self.adapter_spec = spec_of({k: v.detach() for k, v in adapter_parameters(self.fed.model).items()})
        self.load_seconds = time.perf_counter() - started

    # --- persistent state ------------------------------------------------------------------
    def load_state(self, state: RecordDict) -> dict:
        if STATE_KEY in state:
            tensors, _ = decode(blob_of(state[STATE_KEY]))
            return tensors
        initial = init_adapter_state(self.fed.model, self.sim.seed)
        return self.method.init_client(self.cid, initial)

    def save_state(self, state: RecordDict, client: dict) -> None:
        state[STATE_KEY] = ConfigRecord({PAYLOAD: encode(client)})

    # --- handlers (content in, content out) ------------------------------------------------
    def identify(self) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({"partition-id": self.cid, "num-examples": self.num_examples,
                                                 "load-seconds": self.load_seconds})})

    def train(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Decode what the server sent, run the simulator's local round, reply with the payload."""
        # The process's start-up before this message reached fedlora (imports, Flower's pull).
        age = max(0.0, _process_age() - self.load_seconds)
        record = content[RECORD]
        r = int(record["server-round"])
        blob = blob_of(record)
        received, _ = decode(blob)
        check_subset(received, self.adapter_spec)
        n = self.cfg.partition.num_clients
        run = RunState(server={}, clients=[{} for _ in range(n)], optimizer=[None] * n)
        run.clients[self.cid] = self.load_state(state)
        timer = _Timer()
        payload, row = self.sim.local_round(run, self.cid, r, received, timer)
        self.save_state(state, run.clients[self.cid])
        blob_up = encode(payload, {"num_examples": self.num_examples}, round_index=r, client_id=self.cid)
        return RecordDict({RECORD: ConfigRecord({PAYLOAD: blob_up, **{
            "partition-id": self.cid, "server-round": r, "bytes-down": len(blob) if received else 0,
            "train-loss": float(row["train_loss"]), "local-steps": int(row["local_steps"]),
            "train-seconds": round(timer.seconds.get("train", 0.0), 4),
            "prepare-seconds": round(self._take_load_seconds(), 4), "process-seconds": round(age, 4)}})})

    def _take_load_seconds(self) -> float:
        """Seconds this process spent preparing, reported once (0 once the Node is reused)."""
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds

    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Score the adapter the server sent (personal methods: combined with the local state)."""
        received, _ = unpack(content[RECORD])
        check_subset(received, self.adapter_spec)
        adapter = self.method.start_local(received, self.load_state(state)) if self.method.personalized else received
        load_adapter_state(self.fed.model, adapter)
        metrics = evaluate(self.fed.model, self.splits.test, self.fed.pad_id, self.cfg.eval.batch_size)
        # JSON keeps NaN (e.g. AUROC on a one-class test set) exactly as the simulator reports it.
        return RecordDict({RECORD: ConfigRecord({"partition-id": self.cid, "metrics": json.dumps(metrics)})})


def _process_age() -> float:
    """Seconds since this process started (psutil when installed, else 0)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    return max(0.0, time.time() - psutil.Process().create_time())


def check_supported(cfg: RunConfig, method) -> None:
    """What this adapter does not carry yet fails here, with the reason, before any round."""
    problems = []
    hooks = [h for h in ("base_delta", "mixing_layers") if getattr(type(method), h) is not getattr(Method, h)]
    if hooks:
        problems.append(f"{method.name!r} changes the nodes' model between rounds ({', '.join(hooks)})")
    if getattr(method, "decentralized", False):
        problems.append(f"{method.name!r} is serverless (gossip between neighbours), not a server round")
    if method.pooled:
        problems.append(f"{method.name!r} pools every client's rows (a simulation reference only)")
    if cfg.train.optimizer_state == "keep":
        problems.append("train.optimizer_state=keep (optimizer state is not kept on the node yet)")
    if cfg.robust.byzantine > 0 or cfg.robust.momentum is not None:
        problems.append("robust.byzantine / robust.momentum (simulated attackers and worker momentum)")
    if problems:
        raise ValueError("not supported under Flower: " + "; ".join(problems))


def node_for(run_config: Mapping[str, object], node_config: Mapping[str, object]) -> Node:
    """The cached Node of this process for (run config, node config)."""
    cfg = run_config_of(run_config)
    key = (config_to_text(cfg), json.dumps(dict(node_config), sort_keys=True, default=str))
    if key not in _NODES:
        _NODES.clear()  # one run at a time per process; drop the previous run's model
        _NODES[key] = Node(cfg, node_config)
    return _NODES[key]
