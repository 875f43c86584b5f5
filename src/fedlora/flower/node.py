"""One institution's side of a Flower run: its data, its local state, its local round.

A `Node` prepares the base model and this node's data exactly as the simulator does (same config,
same seed, so `partition-id=i` holds the simulator's client i) and runs the same client runtime
as the simulator (`ClientRuntime.train`, fl/client_runtime.py): the same start, trainable mask,
local loop, seeds and payload. What the
node keeps between rounds (the method's per-client state, e.g. FedSA-LoRA's B) lives in Flower's
`context.state` as safetensors bytes, so it never leaves the node and survives the per-message
ClientApp processes Flower spawns.

Per process the preparation (`Site`: model load, data) is cached on the run config and the node's
data selection, not on its partition id: with `--isolation subprocess` (the default) Flower
starts one ClientApp process per message, so the base model is loaded once per message there;
SuperNodes with `--isolation process`, in-process callers (tests) and the Ray actors of Flower's
simulation engine (each answering for many partition ids) load it once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.config.sources import federation_size
from fedlora.fl.client_runtime import ClientRuntime
from fedlora.fl.client_tree import layer_index
from fedlora.fl.cuma_setup import sync_cuma
from fedlora.fl.federation import prepare
from fedlora.fl.methods import build_method, method_options
from fedlora.fl.payload import PayloadError, decode, encode, spec_of
from fedlora.fl.scoring import make_scorer
from fedlora.fl.state import RunState
from fedlora.fl.streams import Streams
from fedlora.fl.timer import Timer
from fedlora.flower.config import config_to_text, node_selection, run_config_of
from fedlora.flower.wire import PAYLOAD, RECORD, blob_of, check_subset, unpack
from fedlora.model.lora import (adapter_parameters, base_weights, init_adapter_state, load_adapter_state,
                                set_base_weights)
from fedlora.model.mixing import EXT_A, EXT_B, attach_mixing, detach_mixing, mixed_layers

log = logging.getLogger("fedlora")

STATE_KEY = "fedlora.client-state"
"""context.state key: this node's persistent method state (safetensors bytes)."""
BASE_KEY = "fedlora.base"
"""context.state key: FLoRA's merged base delta D on this node and its version (merges so far)."""

class Site:
    """What every client id served by this process shares: the prepared base model and data of
    one (config, data selection), the method, the client runtime, the scorer. With built-in data
    that is the whole federation, so one Site serves every partition a process is asked for: a
    Ray actor of Flower's simulation answers for many partition ids and loads the model once."""

    def __init__(self, cfg: RunConfig, data_cfg: RunConfig, own_cid: int = 0):
        started = time.perf_counter()
        self.cfg, self.own_table = cfg, data_cfg is not cfg
        self.fed = prepare(data_cfg)
        self.method = build_method(cfg.fl.method, method_options(cfg, cfg.fl.method))
        check_supported(cfg, self.method)
        # CuMA: its experts and routers on the model, every row's profile from this node's data
        # (fl/cuma_setup.py); its initial tensors join the LoRA ones. {} for other methods.
        self.layer_initial = sync_cuma(self.fed, self.method, cfg.seed,
                                       client_ids=[own_cid] if self.own_table else None)
        self.client = ClientRuntime(self.fed.model, self.method, cfg, Streams(cfg.seed), self.fed.pad_id)
        self.scorer = make_scorer(self.fed)  # label scores for tables, ROUGE/EM/perplexity for generation
        self.adapter_spec = _with_external_branches(
            spec_of({k: v.detach() for k, v in adapter_parameters(self.fed.model).items()}))
        self.moves_base = self.method.overrides("base_delta")
        # FLoRA: the base weights each node's delta is added to, taken before any node moved them
        # (nodes of one Site share the model, and each sets W = W0 + D from its own D per message).
        self.w0: dict | None = None
        self.load_seconds = time.perf_counter() - started


_SITES: dict[tuple[str, str], Site] = {}
_NODES: dict[tuple[str, str, int], Node] = {}


class Node:
    """The prepared federation seen from client `cid`, and the client runtime that runs its rounds.
    `site`: the shared preparation (built here when not given)."""

    def __init__(self, cfg: RunConfig, node_config: Mapping[str, object], site: Site | None = None):
        self.cid, data_cfg = node_selection(node_config, cfg)
        self.site = site if site is not None else Site(cfg, data_cfg, self.cid)
        self.cfg, self.seed = cfg, cfg.seed
        self.federation_size = federation_size(cfg)  # the run's client count (not this node's data)
        self.fed, self.method, self.client = self.site.fed, self.site.method, self.site.client
        self.scorer, self.adapter_spec, self.moves_base = self.site.scorer, self.site.adapter_spec, self.site.moves_base
        # Own table: it is client 0 of a one-client federation.
        self.splits = self.fed.clients[0] if self.site.own_table else self.fed.clients[self.cid]
        self.num_examples = len(self.splits.train)
        # Preparation time is reported by the first node of a Site only (0 for the others).
        self.load_seconds, self.site.load_seconds = self.site.load_seconds, 0.0

    # --- persistent state ------------------------------------------------------------------
    def load_state(self, state: RecordDict) -> dict:
        if STATE_KEY in state:
            tensors, _ = decode(blob_of(state[STATE_KEY]))
            return tensors
        initial = {**init_adapter_state(self.fed.model, self.seed), **self.site.layer_initial}
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
        if self.moves_base:  # the payload is last round's stacked adapter: its rank is K r
            check_stacked(received, self.adapter_spec)
        else:
            check_subset(received, self.adapter_spec)
        self._sync_mixing(received)
        version = self._sync_base(record, received, state)
        n = self.federation_size
        run = RunState(server={}, clients=[{} for _ in range(n)], optimizer=[None] * n)
        run.clients[self.cid] = self.load_state(state)
        timer = Timer()
        payload, row = self.client.train(run, self.cid, r, received, self.splits.train, timer)
        self.save_state(state, run.clients[self.cid])
        blob_up = encode(payload, {"num_examples": self.num_examples}, round_index=r, client_id=self.cid)
        return RecordDict({RECORD: ConfigRecord({PAYLOAD: blob_up, **{
            "partition-id": self.cid, "server-round": r, "bytes-down": len(blob) if received else 0,
            "train-loss": float(row["train_loss"]), "local-steps": int(row["local_steps"]),
            "train-seconds": round(timer.seconds.get("train", 0.0), 4),
            "prepare-seconds": round(self._take_load_seconds(), 4), "process-seconds": round(age, 4),
            **({} if version is None else {"base-version": version})}})})

    def _sync_mixing(self, received: dict) -> None:
        """FedTreeLoRA: attach the mixing layer on the blocks whose external expert was sent.

        The simulator reads these blocks from the server state; a node has only what it received,
        and the download names them exactly (one `mix_ext_A/B` pair per adapted module of a block
        with two or more clusters)."""
        layers = sorted({layer_index(k) for k in received if k.endswith(EXT_A)})
        if layers != mixed_layers(self.fed.model):
            if layers:
                attach_mixing(self.fed.model, layers)
            else:
                detach_mixing(self.fed.model)

    def _take_load_seconds(self) -> float:
        """Seconds this process spent preparing, reported once (0 once the Node is reused)."""
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds

    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Score the adapter the server sent (personal methods: combined with the local state)."""
        received, _ = unpack(content[RECORD])
        check_subset(received, self.adapter_spec)
        self._sync_mixing(received)
        version = self._sync_base(content[RECORD], None, state)
        adapter = self.method.start_local(received, self.load_state(state)) if self.method.personalized else received
        load_adapter_state(self.fed.model, adapter)
        # eval.calibration: fitted on this node's own validation split, on the node (fl/scoring.py)
        metrics = self.scorer.metrics(self.splits.test, self.scorer.calibration_set(self.splits.val))
        if self.scorer.samples:  # generation: the answers are the node's own data; none is kept or sent
            self.scorer.samples.clear()
        # JSON keeps NaN (e.g. AUROC on a one-class test set) exactly as the simulator reports it.
        return RecordDict({RECORD: ConfigRecord({"partition-id": self.cid, "metrics": json.dumps(metrics),
                                                 **({} if version is None else {"base-version": version})})})

    def _sync_base(self, record, stack: dict | None, state: RecordDict) -> int | None:
        """FLoRA: bring this node's base delta D to the server's version and set W = W0 + (alpha/r) D.

        A train message's payload is the stack of the version it names; an evaluate message
        carries it as `base-stack`; a node that fell behind gets the whole D as `base-full`.
        Returns the version now held (None for methods that leave the base alone)."""
        if not self.moves_base:
            return None
        delta, held = self._base_of(state)
        target = int(record["base-version"])
        if "base-full" in record:
            full, _ = decode(bytes(record["base-full"]), expected={f"{m}.delta": (tuple(d.shape), d.dtype) for m, d in delta.items()})
            delta, held = {m: full[f"{m}.delta"] for m in delta}, target
        elif target == held + 1:
            if stack is None:
                stack, _ = decode(bytes(record["base-stack"]))
                check_stacked(stack, self.adapter_spec)
            delta, held = self.method.advance_base(delta, stack), target
        elif target != held:
            raise ValueError(f"node {self.cid} holds base version {held} but the server is at {target} and "
                             f"sent neither the stack nor the whole delta; restart the run")
        state[BASE_KEY] = ConfigRecord({PAYLOAD: encode({f"{m}.delta": d for m, d in delta.items()},
                                                        {"version": held})})
        if self.site.w0 is None:
            self.site.w0 = base_weights(self.fed.model, sorted(delta))
        set_base_weights(self.fed.model, self.site.w0, delta)
        return held

    def _base_of(self, state: RecordDict) -> tuple[dict, int]:
        if BASE_KEY in state:
            tensors, meta = decode(blob_of(state[BASE_KEY]))
            return {k[: -len(".delta")]: v for k, v in tensors.items()}, int(meta["version"])
        initial = init_adapter_state(self.fed.model, self.seed)
        return dict(self.method.base_delta(self.method.init_server(initial))), 0


def check_stacked(tensors: Mapping[str, torch.Tensor], spec: Mapping) -> None:
    """A stacked adapter (FLoRA's download): adapter names and dtypes; per module one rank R for
    A (R x d_in) and B (d_out x R), the other dimension as in the adapter."""
    for name, t in tensors.items():
        if name not in spec or not name.endswith(("lora_A", "lora_B")):
            raise PayloadError(f"unexpected tensor {name!r} in a stacked adapter")
        shape, dtype = spec[name]
        fixed = 1 if name.endswith("lora_A") else 0  # d_in of A, d_out of B
        if t.dim() != 2 or t.shape[fixed] != shape[fixed] or t.dtype != dtype:
            raise PayloadError(f"{name}: {tuple(t.shape)} {t.dtype} is not a stack of {tuple(shape)} {dtype}")
    for name in (n for n in tensors if n.endswith("lora_A")):
        partner = name[: -len("A")] + "B"
        if partner not in tensors or tensors[partner].shape[1] != tensors[name].shape[0]:
            raise PayloadError(f"{name}: no {partner} of the same rank in the stacked adapter")


def _with_external_branches(spec: dict) -> dict:
    """The adapter's spec plus a frozen external branch of the same shape per factor (FedTreeLoRA)."""
    out = dict(spec)
    for name, shape_dtype in spec.items():
        for factor, ext in (("lora_A", EXT_A), ("lora_B", EXT_B)):
            if name.endswith(factor):
                out[name[: -len(factor)] + ext] = shape_dtype
    return out


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
    """The cached Node of this process for (run config, node config).

    The expensive part, the Site (model load and data preparation), is keyed on what it depends
    on: the run config and this node's data selection, never the partition id. One Site is kept
    per process (a new run's config drops the previous model)."""
    cfg = run_config_of(run_config)
    cid, data_cfg = node_selection(node_config, cfg)
    site_key = (config_to_text(cfg), "" if data_cfg is cfg else config_to_text(data_cfg))
    if site_key not in _SITES:
        _SITES.clear()
        _NODES.clear()
        _SITES[site_key] = Site(cfg, data_cfg, cid)
    key = (*site_key, cid)
    if key not in _NODES:
        _NODES[key] = Node(cfg, node_config, _SITES[site_key])
    return _NODES[key]
