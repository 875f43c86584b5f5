"""FedTreeLoRA: personalized federated LoRA with a layer-wise client tree (arXiv 2603.13282).

1. Warm-up (`warmup_rounds`, default 1): FedIT rounds (FedAvg of A and B), as in the same group's
   FedLEASE; the server keeps each client's latest uploaded A_i, B_i and example count n_i.
   Warm-up goes on past `warmup_rounds` until every client has uploaded once (a client that
   dropped out or failed has no B to place in the tree).
2. After the last warm-up round, once: D^(l)_ij = dist(B_{l,i}, B_{l,j}) per layer, D = mean_l D^(l);
   one agglomerative tree T on D; cuts from shallow to deep, c*_l = argmax over
   [c*_(l-1), c*_(l-1) + window) of phi, with phi(1) = tau and phi(c >= 2) = silhouette on D^(l)
   (`fl/client_tree.py`). Cuts never decrease with depth, so groups nest.
3. Experts: for layer l and cluster c, (A_{l,c}, B_{l,c}) = sum_{k in c} p_k (A_{l,k}, B_{l,k}) / sum_{k in c} p_k.
4. Each round client k, at each layer l in cluster c = c_l(k):
      trained:  the cluster expert (A_{l,c}, B_{l,c}) and theta_{l,k}     (lambda = sigmoid(theta))
      frozen:   the external expert = the p-weighted average of the other clusters' experts
      forward:  h = W0 x + s (lambda B_c A_c x + (1 - lambda) B_ext A_ext x)   (`model/mixing.py`)
   Layers with one cluster have no external expert and no lambda (plain LoRA: lambda = 1).
5. Sent up: the cluster expert only (every layer's A and B). lambda stays on the client.
   Sent down: the client's cluster experts and, for mixed layers, its external experts.
6. Server: each (layer, cluster) expert becomes the p-weighted mean of its sampled members' uploads
   (kept as is when no member was sampled).

Scored per client with its own mixture (personalized). With tau >= 1 there is one cluster at
every layer and the method is FedIT exactly (same tensors for the same seed; tested).

Options (the paper leaves these open; defaults documented in docs/methods.md):
    warmup_rounds=1, metric='frobenius' | 'cosine', linkage='average', window=2, tau=0.1,
    mode='tree' | 'independent' (ablation: per-layer trees) | 'fixed' (ablation: fixed_clusters
    everywhere), fixed_clusters=None, lambda_init=0.5.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedlora.fl.client_tree import TreeCuts, build_tree_cuts, client_distances, layer_index, save_tree
from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, weighted_mean
from fedlora.fl.methods.registry import register

_LABELS, _LAYERS, _LINKAGE = "tree.labels", "tree.layers", "tree.linkage"

log = logging.getLogger("fedlora")


def _is_factor(name: str) -> bool:
    return name.endswith(("lora_A", "lora_B"))


def _ext(name: str) -> str:
    """'...q_proj.lora_A' -> '...q_proj.mix_ext_A' (the frozen branch's tensor of that module)."""
    return name[: -len("lora_A")] + ("mix_ext_A" if name.endswith("lora_A") else "mix_ext_B")


def _mix_name(layer: int) -> str:
    return f"model.layers.{layer}.mix_logit"


@register
class FedTreeLoRA(Method):
    name = "fedtree"
    not_mean_because = ("FedTreeLoRA averages within data-dependent clusters, which neither a robust rule "
                        "nor DP-FedAvg's sensitivity covers")
    paper = "arXiv 2603.13282"
    personalized = True
    train_mask = "abm"
    defaults = {"warmup_rounds": 1, "metric": "frobenius", "linkage": "average", "window": 2,
                "tau": 0.1, "mode": "tree", "fixed_clusters": None, "lambda_init": 0.5}

    def __init__(self, **options):
        super().__init__(**options)
        if int(self.options["warmup_rounds"]) < 1:
            raise ValueError("fedtree: warmup_rounds must be >= 1 (the tree needs trained B matrices)")
        if not 0 < float(self.options["lambda_init"]) < 1:
            raise ValueError("fedtree: lambda_init must be in (0, 1)")

    # --- state -----------------------------------------------------------------------------
    def init_server(self, initial: TensorDict) -> TensorDict:
        return {**{k: v.clone() for k, v in initial.items()}, "round": torch.tensor(0)}

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        self._num_clients = max(getattr(self, "_num_clients", 0), client_id + 1)
        return {"client_id": torch.tensor(client_id)}

    # --- the tree, from server state -----------------------------------------------------------
    @staticmethod
    def has_tree(server: TensorDict) -> bool:
        return _LABELS in server

    def _cluster(self, server: TensorDict, cid: int) -> dict[int, int]:
        """Layer index -> the client's cluster id at that layer."""
        labels, layers = server[_LABELS], server[_LAYERS]
        return {int(layer): int(labels[row, cid]) for row, layer in enumerate(layers)}

    def mixing_layers(self, server: TensorDict) -> list[int]:
        """Layers with two or more clusters: the engine gives them an external branch and a lambda."""
        if not self.has_tree(server):
            return []
        labels, layers = server[_LABELS], server[_LAYERS]
        return [int(layer) for row, layer in enumerate(layers) if len(torch.unique(labels[row])) > 1]

    def _adapter_names(self, server: TensorDict) -> list[str]:
        return sorted(k for k in server if _is_factor(k) and not k.startswith(("expert.", "warm.")))

    # --- one client's round --------------------------------------------------------------------
    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        if not self.has_tree(server):
            return {k: server[k] for k in self._adapter_names(server)}
        cluster = self._cluster(server, client_id)
        mixed = set(self.mixing_layers(server))
        out = {}
        for name in self._adapter_names(server):
            layer = layer_index(name)
            out[name] = server[f"expert.{cluster[layer]}.{name}"]
            if layer in mixed:
                out[_ext(name)] = self._external(server, name, cluster[layer])
        return out

    def _external(self, server: TensorDict, name: str, own: int) -> torch.Tensor:
        """p-weighted average of the other clusters' experts at this module's layer."""
        row = int((server[_LAYERS] == layer_index(name)).nonzero()[0, 0])
        labels = server[_LABELS][row]
        weights = server["client_weights"]
        acc, total = torch.zeros_like(server[name], dtype=torch.float64), 0.0
        for c in torch.unique(labels).tolist():
            if c != own:
                w = float(weights[labels == c].sum())
                acc += w * server[f"expert.{c}.{name}"].to(torch.float64)
                total += w
        return (acc / total).to(torch.float32)

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        state = dict(received)
        layers = sorted({layer_index(k) for k in received if k.endswith("mix_ext_A")})
        theta0 = math.log(self.options["lambda_init"] / (1 - self.options["lambda_init"]))
        for layer in layers:
            state[_mix_name(layer)] = client.get(_mix_name(layer), torch.tensor(theta0))
        return state

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        payload = {k: v for k, v in trained.items() if _is_factor(k)}
        kept = {"client_id": client["client_id"],
                **{k: v for k, v in trained.items() if k.endswith("mix_logit")}}
        return payload, kept

    # --- server ------------------------------------------------------------------------------
    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        server = dict(server)
        server["round"] = server["round"] + 1
        names = self._adapter_names(server)
        if not self.has_tree(server):
            if "num_clients" not in server and getattr(self, "_num_clients", 0):
                server["num_clients"] = torch.tensor(self._num_clients)  # saved with the state, for resume
            server.update(weighted_mean(updates, keys=names))
            for u in updates:  # remember each client's latest upload and size for the tree
                server.update({f"warm.{u.client_id}.{k}": u.tensors[k] for k in names})
                server[f"warm.{u.client_id}.n"] = torch.tensor(float(u.num_examples))
            if int(server["round"]) >= int(self.options["warmup_rounds"]):
                missing = self._missing_from_warmup(server)
                if missing:
                    # A client that dropped out or failed has no B to place it in the tree: warm up
                    # (FedAvg) for another round rather than stop the run.
                    log.warning("fedtree: client(s) %s have not uploaded yet; warm-up goes on", missing)
                else:
                    server = self._build_tree(server, names)
            return server
        for u in updates:
            server["client_weights"][u.client_id] = float(u.num_examples)
        cluster_of = {u.client_id: self._cluster(server, u.client_id) for u in updates}
        for name in names:
            layer = layer_index(name)
            members: dict[int, list[ClientUpdate]] = {}
            for u in updates:
                members.setdefault(cluster_of[u.client_id][layer], []).append(u)
            for c, group in members.items():
                server[f"expert.{c}.{name}"] = weighted_mean(group, keys=[name])[name]
        return server

    @staticmethod
    def _missing_from_warmup(server: TensorDict) -> list[int]:
        seen = {int(k.split(".")[1]) for k in server if k.startswith("warm.") and k.endswith(".n")}
        n = int(server["num_clients"]) if "num_clients" in server else max(seen) + 1
        return [c for c in range(n) if c not in seen]

    def _build_tree(self, server: TensorDict, names: list[str]) -> TensorDict:
        clients = sorted({int(k.split(".")[1]) for k in server if k.startswith("warm.") and k.endswith(".n")})
        if clients != list(range(len(clients))) or not clients:
            raise ValueError("fedtree: every client must upload during warm-up to place it in the tree; "
                             "use fl.client_fraction=1 or more fl.method_args.warmup_rounds")
        b_names = [k for k in names if k.endswith("lora_B")]
        per_layer, averaged = client_distances(
            [{k: server[f"warm.{c}.{k}"] for k in b_names} for c in clients], metric=self.options["metric"])
        cuts = build_tree_cuts(per_layer, averaged, window=int(self.options["window"]),
                               tau=float(self.options["tau"]), linkage=self.options["linkage"],
                               mode=self.options["mode"], fixed_clusters=self.options["fixed_clusters"])
        weights = torch.tensor([float(server[f"warm.{c}.n"]) for c in clients], dtype=torch.float64)
        out = {k: v for k, v in server.items() if not k.startswith("warm.") and k != "num_clients"}
        out[_LABELS] = torch.as_tensor(cuts.labels, dtype=torch.int64)
        out[_LAYERS] = torch.tensor(sorted({layer_index(k) for k in b_names}), dtype=torch.int64)
        out[_LINKAGE] = torch.as_tensor(cuts.linkage, dtype=torch.float64)
        out["client_weights"] = weights
        for name in names:  # initial experts: p-weighted means of the members' warm-up uploads
            row = int((out[_LAYERS] == layer_index(name)).nonzero()[0, 0])
            labels = cuts.labels[row]
            for c in np.unique(labels).tolist():
                members = [i for i in clients if labels[i] == c]
                group = [ClientUpdate(i, {name: server[f"warm.{i}.{name}"]}, int(weights[i])) for i in members]
                out[f"expert.{c}.{name}"] = weighted_mean(group, keys=[name])[name]
        return out

    # --- evaluation and outputs ----------------------------------------------------------------
    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return self.start_local(self.download(server, int(client["client_id"])), client)

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return None

    def tree_cuts(self, server: TensorDict) -> TreeCuts | None:
        if not self.has_tree(server):
            return None
        labels = server[_LABELS].numpy()
        return TreeCuts(server[_LINKAGE].numpy(), labels,
                        [len(np.unique(row)) for row in labels], [], params=dict(self.options))

    def save_extras(self, server: TensorDict, folder: Path) -> list[Path]:
        """The tree and its cuts (JSON) and the picture of which clients share which layers (PNG)."""
        cuts = self.tree_cuts(server)
        if cuts is None:
            return []
        return list(save_tree(cuts, folder, layer_ids=server[_LAYERS].tolist()))
