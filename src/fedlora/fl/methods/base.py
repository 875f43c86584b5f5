"""The method interface: what a client trains, what it sends, how the server combines it.

A method holds no hidden state: the server state and each client's persistent state are plain
`{name: tensor}` dicts passed in and returned, so checkpointing a run is saving those dicts.
Methods never touch files, devices or the network; the engine (or the Flower adapter) does.

Round protocol, as the engine drives it for each sampled client i:
    received  = decode(encode(method.download(server, i)))        # counted as bytes down
    adapter   = method.start_local(received, client_state[i])       # loaded into the model
    trained   = local_train(adapter, trainable=method.train_mask)
    payload, client_state[i] = method.upload(trained, client_state[i])
    update_i  = decode(encode(payload))                             # counted as bytes up
then   server = method.aggregate(server, [update_i ...]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

TensorDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's decoded upload and the example count used as its aggregation weight."""

    client_id: int
    tensors: TensorDict
    num_examples: int


class Method:
    """Base class; subclasses override the hooks that differ from plain FedAvg bookkeeping."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    personalized: ClassVar[bool] = False
    """Scored per client on its own adapter (True) or with one global adapter (False)."""
    pooled: ClassVar[bool] = False
    """Centralized reference: the engine trains one client holding every client's training rows."""
    train_mask: ClassVar[str] = "ab"
    """Which LoRA factors local training updates: 'ab', 'a' or 'b'."""
    decentralized: ClassVar[bool] = False
    """Serverless: clients mix with graph neighbours (`fl/gossip.py`, methods deriving from
    `GossipMethod` in `fl/methods/gossip_base.py`); the server `Simulator` refuses them."""
    defaults: ClassVar[dict[str, Any]] = {}
    """Method options (fl.method_args) and their defaults."""
    fresh_each_round: ClassVar[bool] = False
    """Each round a client trains a fresh adapter the engine draws (A from (seed, round, client),
    B = 0) instead of the one `start_local` returns, with a fresh optimizer (FLoRA)."""
    mean_aggregation: ClassVar[bool] = False
    """`aggregate` starts from the example-weighted mean of the uploads (`weighted_mean`), every
    client downloads the same tensors under the names it uploads, and aggregating one update
    gives that update: the engine may then replace the mean by a robust chain (config `robust`)."""
    side_channels: ClassVar[tuple[str, ...]] = ()
    """Name prefixes of payload tensors that are not adapter factors (e.g. a sketch or a small model
    the method sends beside its adapter). The payload schema already holds them (it is derived from
    `upload`); declaring them lets the engine refuse what cannot cover them (DP) before round 1."""
    not_mean_because: ClassVar[str] = ""
    """Why a method without `mean_aggregation` cannot take a robust chain, attacks, worker momentum
    or DP-FedAvg (the message `fl/combine.check_composition` gives)."""

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"method {self.name!r} has no option {unknown[0]!r} (valid: {valid})")
        self.options = {**self.defaults, **options}

    # --- state -----------------------------------------------------------------------------
    def init_server(self, initial: TensorDict) -> TensorDict:
        return clone(initial)

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return {}

    # --- one client's round ----------------------------------------------------------------
    def train_mask_at(self, round_index: int) -> str:
        """The factors trained in round `round_index` (1-based): `train_mask` unless the method
        alternates factors by round (TAD-LoRA, RoLoRA)."""
        return self.train_mask

    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        return server

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return received

    def extra_loss(self, params: dict[str, torch.nn.Parameter],
                   received: TensorDict) -> Callable[[], torch.Tensor] | None:
        """An optional extra term added to the local loss (e.g. FedProx); None for most methods."""
        return None

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        return trained, client

    # --- server ----------------------------------------------------------------------------
    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        raise NotImplementedError

    # --- the shared model (optional; the defaults leave it as every other method sees it) ---
    def client_rank(self, client_id: int) -> int | None:
        """The rank r_i <= r this client trains at, or None for the model's rank r.

        The engine emulates rank r_i inside the shared rank-r adapter: rows of A and columns of B
        from r_i on are zero (they stay zero in training), and the layers scale by alpha / r_i.
        """
        return None

    def base_delta(self, server: TensorDict) -> TensorDict | None:
        """Additions to the frozen base weights, by LoRA module name, or None (the base is left alone).

        In the adapter's units: the engine sets W = W0 + (alpha / r) * delta[m] for the whole round
        (training and evaluation) and restores W0 bitwise after it (FLoRA's merged updates).
        """
        return None

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether the method defines its own `hook` (e.g. 'base_delta', 'mixing_layers'), i.e. needs
        what the hook implies (a base that moves, mixing layers) wherever it runs."""
        return getattr(cls, hook) is not getattr(Method, hook)

    def advance_base(self, delta: TensorDict, download: TensorDict) -> TensorDict:
        """A client's own base delta after it merges one `download` (methods with `base_delta`).

        The simulator reads the delta from the server state; a Flower node keeps its own copy and
        advances it with what each round sends it, as the paper's clients do with their base.
        """
        raise NotImplementedError(f"{self.name} has no base delta to advance")

    def mixing_layers(self, server: TensorDict) -> list[int]:
        """Transformer blocks that get a frozen external LoRA branch and a learnable per-block
        mixing weight (`model/mixing.py`; FedTreeLoRA). The engine attaches them while the method
        runs and removes them afterwards; their tensors then travel in the adapter state."""
        return []

    # --- evaluation ------------------------------------------------------------------------
    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return server

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return server

    # --- outputs ---------------------------------------------------------------------------
    def save_extras(self, server: TensorDict, folder: Path) -> list[Path]:
        """Method-specific artifacts (e.g. FedTreeLoRA's tree and picture) into a folder the
        experiment layer chose; the only place a method writes files. Returns what it wrote."""
        return []


def factor(tensors: TensorDict, name: str) -> TensorDict:
    """The tensors of one LoRA factor ('lora_A' or 'lora_B'), by name suffix."""
    return {k: v for k, v in tensors.items() if k.endswith(name)}


def clone(tensors: TensorDict) -> TensorDict:
    return {k: v.clone() for k, v in tensors.items()}


def example_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """p_i = n_i / sum_j n_j."""
    counts = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError("every update must report a positive example count")
    return counts / counts.sum()


def weighted_mean(updates: Sequence[ClientUpdate], keys: Sequence[str] | None = None) -> TensorDict:
    """sum_i p_i T_i for every tensor name (in float64 for accuracy, returned as float32)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    weights = example_weights(updates)
    keys = list(keys if keys is not None else updates[0].tensors)
    out = {}
    for key in keys:
        acc = torch.zeros_like(updates[0].tensors[key], dtype=torch.float64)
        for w, u in zip(weights, updates):
            acc += w * u.tensors[key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out
