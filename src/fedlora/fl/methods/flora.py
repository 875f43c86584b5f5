"""FLoRA: stack the clients' LoRAs and merge them into the base (Wang et al., NeurIPS 2024, arXiv 2409.05976).

- Trained on each client, every round: a FRESH LoRA of rank r_i (A drawn from (seed, round, client),
  B = 0) on the current base weights W^t; A and B both train (the engine draws it: `fresh_each_round`).
- Sent: A_i (r_i x d_in) and B_i (d_out x r_i) with the example count n_i.
- Combined, per adapted layer, with p_i = n_i / sum_j n_j and c_i = p_i * r / r_i:
      A_glob = [c_1 A_1; ...; c_K A_K]   (rows stacked, rank R = sum_i r_i)
      B_glob = [B_1 ... B_K]              (columns stacked)
  so that  B_glob A_glob = sum_i c_i B_i A_i  exactly (no cross terms, unlike FedIT), and the base is
      W^{t+1} = W^t + (alpha / r) B_glob A_glob = W^t + sum_i p_i (alpha / r_i) B_i A_i.
  The paper scales A by p_i and gives the stacked adapter lora_alpha = alpha K at rank K r, which is
  the same alpha / r; c_i also folds in r / r_i for heterogeneous ranks.
- Downlink: from round 2 on, the previous round's stacked (A_glob, B_glob), which each client merges
  into its copy of the base; its size grows with the number of clients K. Round 1 sends nothing.

Simulator: the server state keeps the cumulative merged update D = sum_t B_glob^t A_glob^t per layer
(d_out x d_in, in the adapter's units), and `base_delta` hands it to the engine, which sets
W = W0 + (alpha / r) D on the shared model for the round and restores W0 bitwise afterwards; no
client copies the base. Evaluation uses that merged base with a zero adapter (B = 0).

Heterogeneous ranks (option `ranks`, one r_i <= lora.r per client): each client trains inside the
shared rank-r adapter with A rows and B columns from r_i on held at zero (their gradients are exactly
zero) and with the layers' scaling set to alpha / r_i while it trains, as a true rank-r_i LoRA with
the same lora_alpha would. The upload drops those zero components, so bytes up are those of rank r_i.

>>> import torch
>>> from fedlora.fl.methods import ClientUpdate, build_method
>>> m = build_method("flora")
>>> server = m.init_server({"l.lora_A": torch.zeros(1, 2), "l.lora_B": torch.zeros(2, 1)})
>>> ups = [ClientUpdate(i, {"l.lora_A": torch.ones(1, 2) * (i + 1), "l.lora_B": torch.ones(2, 1)}, 1)
...        for i in range(2)]
>>> out = m.aggregate(server, ups)
>>> tuple(out["l.lora_A"].shape), out["l.delta"].tolist()    # rank 2 stack; 0.5 * 1 + 0.5 * 2
((2, 2), [[1.5, 1.5], [1.5, 1.5]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, example_weights
from fedlora.fl.methods.registry import register

_RANK = "lora_rank"  # server key: the model's rank r (a 0-d int64 tensor)


def _modules(tensors: TensorDict, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))


def _rank(adapter: TensorDict) -> int:
    """The rank r of an adapter (rows of its first A)."""
    return adapter[min(k for k in adapter if k.endswith(".lora_A"))].shape[0]


def stack(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A_glob = [w_1 A_1; ...; w_K A_K], B_glob = [B_1 ... B_K]: B_glob A_glob = sum_k w_k B_k A_k.

    `factors` are (A_k, B_k) pairs of shapes (r_k, d_in) and (d_out, r_k); ranks may differ.
    Returned in float32 (A scaled in float64 first).
    """
    a = torch.cat([(float(w) * a_k.to(torch.float64)).to(torch.float32) for (a_k, _), w in zip(factors, weights)])
    b = torch.cat([b_k.to(torch.float32) for _, b_k in factors], dim=1)
    return a, b


def trim_zero_rank(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing components whose A row and B column are both exactly zero (B A is unchanged)."""
    live = (a != 0).any(dim=1) | (b != 0).any(dim=0)
    keep = int(live.nonzero().max()) + 1 if live.any() else 1  # keep one component: shapes stay valid
    return a[:keep], b[:, :keep]


@register
class FLoRA(Method):
    name = "flora"
    not_mean_because = "FLoRA stacks the clients' factors into a larger adapter instead of averaging them"
    paper = "arXiv 2409.05976"
    fresh_each_round = True
    defaults = {"ranks": None, "export_rank": None}
    """ranks: one rank r_i <= lora.r per client (None: every client at lora.r). export_rank: the rank
    of the PEFT adapter saved from the merged delta by truncated SVD (None: lora.r); the exact delta
    is saved beside it (`model/export.py`)."""

    def __init__(self, **options):
        super().__init__(**options)
        ranks = self.options["ranks"]
        if ranks is not None and (not isinstance(ranks, (list, tuple))
                                  or not all(isinstance(x, int) and x >= 1 for x in ranks)):
            raise ValueError(f"flora: ranks must be a list of positive integers, one per client (got {ranks!r})")
        export_rank = self.options["export_rank"]
        if export_rank is not None and (not isinstance(export_rank, int) or export_rank < 1):
            raise ValueError(f"flora: export_rank must be a positive integer or null (got {export_rank!r})")

    # --- state -----------------------------------------------------------------------------
    def init_server(self, initial: TensorDict) -> TensorDict:
        """D = 0 per layer, plus the model's rank r; no stacked adapter until round 1 is merged."""
        server = {f"{m}.delta": torch.zeros(initial[f"{m}.lora_B"].shape[0], initial[f"{m}.lora_A"].shape[1])
                  for m in _modules(initial, ".lora_A")}
        server[_RANK] = torch.tensor(_rank(initial))
        return server

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        ranks = self.options["ranks"]
        if ranks is not None:  # fail at set-up, not in round 1
            r = _rank(initial)
            if client_id >= len(ranks):
                raise ValueError(f"flora: ranks has {len(ranks)} entries; it needs one per client")
            if ranks[client_id] > r:
                raise ValueError(f"flora: client {client_id} rank {ranks[client_id]} exceeds lora.r = {r}")
        return {}

    def client_rank(self, client_id: int) -> int | None:
        ranks = self.options["ranks"]
        return None if ranks is None else int(ranks[client_id])

    # --- one client's round ----------------------------------------------------------------
    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        """The last round's stacked adapter (empty before the first merge)."""
        return {k: v for k, v in server.items() if k.endswith((".lora_A", ".lora_B"))}

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        """A_i and B_i without the zero padding of a rank r_i < r (the real rank-r_i bytes)."""
        out = {}
        for m in _modules(trained, ".lora_A"):
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = trim_zero_rank(trained[f"{m}.lora_A"], trained[f"{m}.lora_B"])
        return out, client

    # --- server ----------------------------------------------------------------------------
    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        p = example_weights(updates)
        r = int(server[_RANK])
        ranks = [self.client_rank(u.client_id) or r for u in updates]
        scale = [float(p_i) * r / r_i for p_i, r_i in zip(p, ranks)]
        out = {_RANK: server[_RANK].clone()}
        for m in _modules(server, ".delta"):
            factors = [(u.tensors[f"{m}.lora_A"], u.tensors[f"{m}.lora_B"]) for u in updates]
            for (a_i, b_i), r_i, u in zip(factors, ranks, updates):
                if not a_i.shape[0] == b_i.shape[1] <= r_i:
                    raise ValueError(f"flora: client {u.client_id} sent {m} with ranks {a_i.shape[0]} (A) and "
                                     f"{b_i.shape[1]} (B); expected equal and <= {r_i}")
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = stack(factors, scale)
        deltas = {m: server[f"{m}.delta"] for m in _modules(server, ".delta")}
        out.update({f"{m}.delta": d for m, d in self.advance_base(deltas, out).items()})
        return out

    def advance_base(self, delta: TensorDict, download: TensorDict) -> TensorDict:
        """D + B_glob A_glob per module (the product in fp64): the server's update of its D, and
        what a Flower node does with the stacked adapter it downloads (bitwise the same)."""
        out = {}
        for m, d in delta.items():
            a, b = download[f"{m}.lora_A"], download[f"{m}.lora_B"]
            out[m] = d + (b.to(torch.float64) @ a.to(torch.float64)).to(torch.float32)
        return out

    def base_delta(self, server: TensorDict) -> TensorDict | None:
        return {m: server[f"{m}.delta"] for m in _modules(server, ".delta")}

    # --- evaluation ------------------------------------------------------------------------
    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        """A zero adapter (B = 0): the knowledge is in the merged base, W0 + (alpha / r) D."""
        if not server:
            return {}
        r = int(server[_RANK])
        out = {}
        for m in _modules(server, ".delta"):
            d_out, d_in = server[f"{m}.delta"].shape
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = torch.zeros(r, d_in), torch.zeros(d_out, r)
        return out
