"""The serverless simulator: clients train, then gossip with the neighbours of a (time-varying) graph.

Per round t (`GossipSimulator._round`):
1. G_t and W_t from the configured `Topology` (config `topology`; seeded by (seed, t)).
2. Every client trains its own adapter with the client runtime every engine uses
   (`ClientRuntime.train`: copy into the one shared frozen model, `method.train_mask_at(t)`,
   the local loop, read back), seeded by (seed, t, client) as in a server round.
Then the combine step is gossip over the topology (`GossipCombine`):
3. Every client builds its payload `method.send(x_i, t)`; it is encoded to safetensors once per
   edge of G_t, with its round and sender in the metadata, and the receiver decodes and validates
   it (names, shapes and dtypes of its own payload, finite values, round, sender, an example
   count within the sender's declared size). Bytes are
   counted per directed edge.
4. Client i mixes with `method.mix(x_i, inbox_i, weights_i, t)`, where inbox_i holds the decoded
   payloads of N_t(i) and nothing else, and weights_i is its row of W_t (a rejected payload's
   weight goes to W_ii). All clients mix from the same pre-mix states (synchronous gossip).

Faults (config `fl`, drawn as in the server simulator, `fl/faults.py`): a client that drops out,
or whose training raises, is off line for the round: it neither trains, sends nor mixes, and
W_t is built on the graph of the clients on line. A straggler past `fl.deadline` trains, but its
payloads miss the round (its neighbours keep that weight on their own adapter); gossip has no
server to buffer a late payload, so only `straggler_policy: drop` applies.

Rows follow the server simulator's format. Per client: train loss, steps, bytes sent (`bytes_up`)
and received (`bytes_down`), degree, the phase trained; on evaluated rounds its scores on its own
test split and, as `global_accuracy` etc., on the global test (TAD-LoRA's convention). The
'global' row is the mean over clients on the global test (with `*_std`, the spread over clients).
There is no server: the 'server' row is the round's network row (graph size, connectivity, rho,
consensus distances, the bytes of every edge). Its `bytes_up` counts each transfer once (as
sent) and its `bytes_down` is 0, so "MB sent" compares with a server method's uploads plus
downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fedlora.config import ConfigError
from fedlora.fl.engine import RunState, Simulator
from fedlora.fl.faults import guarded
from fedlora.fl.federation import Federation
from fedlora.fl.methods.base import Method, TensorDict
from fedlora.fl.payload import PayloadError, encode, spec_of
from fedlora.fl.schema import PayloadSchema
from fedlora.fl.scoring import make_scorer
from fedlora.fl.timer import Timer
from fedlora.fl.topology import Topology, num_components
from fedlora.model.lora import load_adapter_state
from fedlora.report.summary import reported

log = logging.getLogger("fedlora")


def consensus_distance(states: Sequence[TensorDict]) -> dict[str, float]:
    """Mean over clients of the squared distance to the clients' average, summed over tensors.

    `consensus_adapter` over every A and B, `consensus_a` / `consensus_b` per factor, and
    `consensus_product` over the products B A of each LoRA module (what the model uses).
    """
    def spread(stacks: list[torch.Tensor]) -> float:
        return float(sum(((s - s.mean(0)) ** 2).sum() for s in stacks) / len(states)) if stacks else 0.0

    keys = sorted(k for k in states[0] if k.endswith(("lora_A", "lora_B")))
    stack = {k: torch.stack([s[k].to(torch.float64) for s in states]) for k in keys}
    modules = [k[: -len(".lora_A")] for k in keys if k.endswith("lora_A")]
    products = [stack[f"{m}.lora_B"] @ stack[f"{m}.lora_A"] for m in modules]
    return {
        "consensus_adapter": spread(list(stack.values())),
        "consensus_a": spread([v for k, v in stack.items() if k.endswith("lora_A")]),
        "consensus_b": spread([v for k, v in stack.items() if k.endswith("lora_B")]),
        "consensus_product": spread(products),
    }


class GossipCombine:
    """Gossip as the combine step over a topology: every edge j -> i of G_t carries j's payload,
    encoded for that edge and validated by i (names, shapes, dtypes, finite values, round, sender,
    example count), and each client mixes with its row of W_t. No server, no global state."""

    def __init__(self, method: Method, declared: Callable[[int], int]):
        self.method, self.declared = method, declared

    def __call__(self, clients: list[TensorDict], adj: np.ndarray, weights: np.ndarray, r: int, timer: Timer,
                 late: list[int] = ()) -> tuple[list[TensorDict], list[list[int]], list[list]]:
        """(every client's mixed state, [j, i, bytes] per edge, [j, i, reason] per rejected payload);
        all clients mix from the same pre-mix states (synchronous gossip)."""
        inboxes, edges, rejected = self.exchange(clients, adj, r, timer, late=late)
        with timer("mix"):
            mixed = [self.mix_one(clients[i], inboxes[i], weights[i], adj[i], i, r) for i in range(len(adj))]
        return mixed, edges, rejected

    def exchange(self, clients: list[TensorDict], adj: np.ndarray, r: int, timer: Timer,
                 late: list[int] = ()) -> tuple[list[dict[int, TensorDict]], list[list[int]], list[list]]:
        """Every edge j -> i of the round's graph carries j's payload, encoded for that edge and
        validated by i. Returns each client's inbox {j: tensors}, [j, i, bytes] per edge, and
        [j, i, reason] per rejected payload. A `late` client's payloads miss the round's deadline:
        its neighbours mix without them (their weight stays on the receiver's own adapter)."""
        payloads = [self.method.send(c, r) for c in clients]
        inboxes: list[dict[int, TensorDict]] = [{} for _ in clients]
        edges, rejected = [], []
        with timer("serialize"):
            for j, payload in enumerate(payloads):
                if j in late:
                    continue
                for i in np.flatnonzero(adj[j]).tolist():
                    blob = encode(payload, {"num_examples": self.declared(j)}, round_index=r, client_id=j)
                    edges.append([j, i, len(blob)])
                    try:  # the receiver's schema: this round's payload of the common phase schedule
                        inboxes[i][j], _ = PayloadSchema(spec_of(payloads[i])).decode(
                            blob, round_index=r, sender=j, max_examples=self.declared(j))
                    except PayloadError as exc:
                        log.warning("round %d: payload %d -> %d rejected: %s", r, j, i, exc)
                        rejected.append([j, i, exc.reason])
        return inboxes, edges, rejected

    def mix_one(self, own: TensorDict, inbox: dict[int, TensorDict], w_row: np.ndarray, neighbours: np.ndarray,
             cid: int, r: int) -> TensorDict:
        """Client `cid` mixes with its row of W; it can only be handed its neighbours' payloads."""
        strangers = [j for j in inbox if not neighbours[j]]
        if strangers:
            raise RuntimeError(f"round {r}: client {cid} was handed payloads of non-neighbours {strangers}")
        weights: dict[int | str, float] = {j: float(w_row[j]) for j in inbox}
        weights["self"] = float(w_row[cid]) + sum(float(w_row[j]) for j in np.flatnonzero(neighbours) if j not in inbox)
        return self.method.mix(own, inbox, weights, r)



class GossipSimulator(Simulator):
    """Runs one decentralized method (`Method.decentralized`) on a prepared `Federation`.

    >>> result = GossipSimulator(fed, "tad_lora").run()          # doctest: +SKIP
    """

    serverless = True

    def __init__(self, fed: Federation, method: str | Method, seed: int | None = None,
                 on_round: Callable[[int, list[dict]], None] | None = None, progress: bool = False,
                 checkpoint_dir: str | Path | None = None):
        _check_serverless(fed.cfg)
        super().__init__(fed, method, seed=seed, on_round=on_round, progress=progress, checkpoint_dir=checkpoint_dir)
        if not self.method.decentralized:
            raise ValueError(f"method {self.method.name!r} needs a server: run it with fedlora.fl.engine.Simulator")
        self.topology = Topology(self.cfg.topology, len(self.train_sets), self.seed)
        self.rho = self.topology.rho()
        self.method = self.method.for_topology(self.rho, self.cfg.fl.rounds)
        self.gossip = GossipCombine(self.method, lambda cid: len(self.train_sets[cid]))
        log.info("topology %s on %d clients: rho = %.4f; %s options %s", self.cfg.topology.graph,
                 len(self.train_sets), self.rho, self.method.name, self.method.options)

    def sample_clients(self, round_index: int) -> list[int]:
        return list(range(len(self.train_sets)))  # every client trains every round

    # --- one round ---------------------------------------------------------------------------
    def _round(self, state: RunState) -> list[dict]:
        r, timer, method = state.round + 1, Timer(), self.method
        adj = self.topology.adjacency(r)
        faults = self._faults(self.sample_clients(r), r)
        rows = []
        for cid in self.sample_clients(r):
            if cid not in faults.dropped:
                row, failure = guarded(state, cid, r, lambda cid=cid: self._train(state, cid, r, timer))
                rows.append(row if failure is None else {**failure, "phase": method.train_mask_at(r)})
        # An offline client (dropped out, or its training failed) leaves this round's graph: it
        # neither sends nor mixes, and W is built on the graph of those that are on line.
        offline = sorted({*faults.dropped, *(row["client"] for row in rows if row.get("failed"))})
        adj = adj.copy()
        adj[offline, :] = 0
        adj[:, offline] = 0
        state.clients, edges, rejected = self.gossip(state.clients, adj, self.topology.mixing(adj), r, timer,
                                                     late=faults.late)
        for row in rows:
            cid = row["client"]
            row.update({"bytes_up": sum(b for j, _, b in edges if j == cid),
                        "bytes_down": sum(b for _, i, b in edges if i == cid), "degree": int(adj[cid].sum())})
        network = {"client": "server", "sampled": self.sample_clients(r), **self._graph_row(adj),
                   "phase": method.train_mask_at(r), "sent": method.sent_at(r),
                   "bytes_up": sum(b for _, _, b in edges), "bytes_down": 0, "edge_bytes": edges,
                   "rejected": rejected, "num_rejected": len(rejected), "dropped": faults.dropped,
                   "late": faults.late, "failed": [row["client"] for row in rows if row.get("failed")],
                   **consensus_distance(state.clients)}
        if "interval" in method.options:
            network["interval"] = method.options["interval"]
        every = self.cfg.fl.eval_every
        if r == self.cfg.fl.rounds or (every and r % every == 0):
            train = {row["client"]: row for row in rows}  # a client's training numbers join its scores
            rows = [{**train.pop(er["client"], {}), **er} for er in self.evaluate(state, timer)]
            rows = list(train.values()) + rows
        rows.append({**network, **{f"time_{k}": round(v, 4) for k, v in timer.seconds.items()}})
        state.round = r
        for row in rows:
            row.update({"round": r, "method": method.name})
        return rows

    def _train(self, state: RunState, cid: int, r: int, timer: Timer) -> dict:
        """Local steps on client `cid`'s adapter; AdamW state is kept per trained factor set."""
        mask = self.method.train_mask_at(r)
        saved = state.optimizer[cid] or {}
        state.optimizer[cid] = None if self.method.reset_optimizer else saved.get(mask)
        _, row = self.local_round(state, cid, r, {}, timer)
        state.optimizer[cid] = {**saved, mask: state.optimizer[cid]} if not self.method.reset_optimizer else None
        return {**row, "phase": mask}

    def _graph_row(self, adj: np.ndarray) -> dict:
        components = num_components(adj)
        return {"graph": self.cfg.topology.graph, "edges": int(adj.sum() // 2), "components": components,
                "connected": components == 1, "isolated": int((adj.sum(1) == 0).sum()), "rho": self.rho}

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(self, state: RunState, timer: Timer) -> list[dict]:
        """Each client's adapter on its own test split and on the global test; the mean over clients.

        There is no global adapter: each adapter is calibrated by its owner on its own validation
        split (eval.calibration), on its own test and, with global_calibration=pooled_val, on the
        global test too; with 'holdout', on the global holdout under that adapter."""
        fed, model = self.fed, self.fed.model
        on_global = self.cfg.eval.global_test and len(fed.global_test) > 0
        scorer = make_scorer(fed)
        rows, scores = [], []
        with timer("eval"):
            for cid, client in enumerate(fed.clients):
                load_adapter_state(model, self.method.personal_adapter(state.server, state.clients[cid]))
                cal = scorer.calibration_set(client.val)
                row = {"client": cid, "split": "test", **scorer.metrics(client.test, cal)}
                if on_global:
                    cal = scorer.global_set([cal]) if cal is not None else None
                    scores.append(scorer.metrics(fed.global_test, cal))
                    row.update({f"global_{m}": scores[-1][m] for m in reported(scores[-1])})
                rows.append(row)
        self.samples = scorer.samples  # a generation task's sample answers (the latest evaluation)
        if scores:
            table = {m: np.asarray([s[m] for s in scores], dtype=float) for m in reported(scores[0])}
            mean = {m: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for m, v in table.items()}
            std = {f"{m}_std": float(np.nanstd(v)) if not np.isnan(v).all() else float("nan") for m, v in table.items()}
            rows.append({"client": "global", "split": "global_test", "scored_on": "mean over clients' adapters",
                         **mean, **std, "n": scores[0]["n"]})
        return rows


def _check_serverless(cfg) -> None:
    """Settings of the server simulator that a gossip run does not support fail early, by key."""
    fl = cfg.fl
    unsupported = [
        ("fl.client_fraction", fl.client_fraction != 1, "1 (every client trains every round; sparsity comes "
                                                        "from the topology)"),
        ("fl.straggler_policy", fl.deadline is not None and fl.straggler_policy != "drop",
         "drop (a late payload misses the round; gossip has no server to buffer it)"),
        ("robust.byzantine", cfg.robust.byzantine > 0, "0 (robust gossip is out of scope)"),
        ("robust.aggregator", cfg.robust.aggregator is not None, "null"),
        ("robust.momentum", cfg.robust.momentum is not None, "null"),
        ("dp.enabled", bool(getattr(getattr(cfg, "dp", None), "enabled", False)), "false"),
    ]
    for key, bad, fix in unsupported:
        if bad:
            raise ConfigError(f"{key} is not supported by decentralized methods; set {key}={fix}")
