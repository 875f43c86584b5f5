"""The interface of decentralized (gossip) methods: no server, each client keeps its own adapter.

Round t, driven by `fl/gossip.py` for every client i of the graph G_t with mixing matrix W_t:
    mask = method.train_mask_at(t)                     # the factors local steps update
    x_i  = local steps on x_i (Simulator.local_round: start_local -> train -> upload)
    p_i  = method.send(x_i, t)                         # encoded once per edge (bytes counted)
    x_i  = method.mix(x_i, {j: p_j for j in N_t(i)}, {i: W_ii, j: W_ij}, t)
Client i never sees a payload of a client outside N_t(i): the engine hands `mix` only those.

Every client starts from the same adapter (A from the run seed, B = 0), as the papers do. The
methods are personalized in the engine's sense (scored per client, each on its own adapter);
the engine also scores each client's adapter on the global test, TAD-LoRA's convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedlora.fl.methods.base import TensorDict
from fedlora.fl.methods.local import LocalOnly


def phase(round_index: int, interval: int) -> str:
    """'b' when floor((t - 1) / T) is even (B first: with B = 0 the gradient of A is 0), else 'a'.

    >>> [phase(t, 2) for t in range(1, 7)]
    ['b', 'b', 'a', 'a', 'b', 'b']
    """
    return "b" if ((round_index - 1) // interval) % 2 == 0 else "a"


def auto_interval(rho: float, constant: float, rounds: int) -> int:
    """T = ceil(c / sqrt(1 - rho)) (TAD-LoRA's T* ~ 1/sqrt(1 - rho)), in [1, rounds]; rounds when rho = 1."""
    if rho >= 1:
        return rounds
    return int(min(rounds, max(1, math.ceil(constant / math.sqrt(1 - rho)))))


def check_interval(method: str, value) -> None:
    if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
        raise ValueError(f"{method}: option 'interval' must be an integer >= 1 or 'auto', got {value!r}")


def gossip_average(own: TensorDict, neighbours: Mapping[int, TensorDict], weights: Mapping[int | str, float],
                   keys: Sequence[str]) -> TensorDict:
    """x_i = W_ii x_i + sum_j W_ij x_j for each name in `keys`; `weights['self']` is W_ii.

    Summed in float64 (own first, then neighbours by id) and returned as float32, so mixing copies
    of one tensor gives that tensor bit for bit (a frozen, shared A stays shared).
    """
    out = {}
    for key in keys:
        acc = weights["self"] * own[key].to(torch.float64)
        for j in sorted(neighbours):
            acc = acc + weights[j] * neighbours[j][key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out


def _factors(tensors: TensorDict, which: str) -> TensorDict:
    suffixes = tuple(f"lora_{f.upper()}" for f in which)
    return {k: v for k, v in tensors.items() if k.endswith(suffixes)}


class GossipMethod(LocalOnly):
    """Base of the decentralized methods: local-only training (each client keeps its own adapter
    and nothing goes to a server) plus a gossip mix with the round's neighbours. With no edges a
    gossip method is exactly local-only training. Subclasses choose what is trained and sent."""

    name = ""
    decentralized = True
    not_mean_because = "it is decentralized: there is no server to combine the uploads (or to add noise)"
    sent: ClassVar[str] = "ab"
    """The factors sent to (and mixed with) neighbours: 'ab', 'a' or 'b'."""

    # --- gossip ------------------------------------------------------------------------------
    def sent_at(self, round_index: int) -> str:
        """The factors sent and mixed in round `round_index`."""
        return self.sent

    def send(self, client: TensorDict, round_index: int) -> TensorDict:
        """What client sends to each neighbour this round (the same tensors on every edge)."""
        return _factors(client, self.sent_at(round_index))

    def mix(self, own: TensorDict, neighbours: Mapping[int, TensorDict], weights: Mapping[int | str, float],
            round_index: int) -> TensorDict:
        """The client's new adapter: its sent factors gossip-averaged, the others kept."""
        return {**own, **gossip_average(own, neighbours, weights, list(self.send(own, round_index)))}

    def for_topology(self, rho: float, rounds: int) -> GossipMethod:
        """This method with any topology-dependent option resolved (TAD-LoRA's automatic T)."""
        return self

    @property
    def reset_optimizer(self) -> bool:
        """A fresh AdamW every round whatever train.optimizer_state says (the alternating methods)."""
        return bool(self.options.get("reset_optimizer", False))
