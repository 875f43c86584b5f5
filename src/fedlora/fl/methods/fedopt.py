"""Server optimizers over FedIT: FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al., arXiv 2003.00295).

- Trained and sent: as FedIT (A and B both ways).
- Combined: the server treats Delta = sum_i p_i x_i - x (the averaged change of the adapter) as a
  pseudo-gradient and takes a step of its own optimizer (rules in `fedlora.fl.server_opt`):
      fedavgm     m = beta1 m + Delta                                      x += server_lr m
      fedadagrad  m = beta1 m + (1-beta1) Delta;  v += Delta^2              x += server_lr m / (sqrt(v) + tau)
      fedadam     ... v = beta2 v + (1-beta2) Delta^2                       (same step)
      fedyogi     ... v = v - (1-beta2) Delta^2 sign(v - Delta^2)           (same step)
  No bias correction (the paper's Algorithm 2 has none). FedAvg is fedavgm with beta1 = 0 and
  server_lr = 1.
- Server state: the adapter under its own names plus the moments as 'opt.m.<name>' and
  'opt.v.<name>' tensors, so a checkpoint holds them. Only the adapter is downloaded and scored.
- Options and defaults:
  fedavgm (Hsu et al., arXiv 1909.06335): server_lr 1.0, beta1 0.9 (their usual momentum; the
    step settles at about server_lr / (1 - beta1) = 10 Delta, lower server_lr to keep it near 1).
  adaptive: beta1 0.9, beta2 0.99 (the values the paper fixes), tau 1e-3 (the paper tunes tau and
    finds the methods robust around it), v0 = tau^2 (Algorithm 2: v_{-1} >= tau^2), server_lr 1e-2
    (the paper tunes it per task on a log grid; 1e-2 is our starting point, tune it). With Adam
    the first step moves each tensor entry by about server_lr, whatever the scale of Delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from fedlora.fl import server_opt
from fedlora.fl.methods.base import ClientUpdate, TensorDict, clone, weighted_mean
from fedlora.fl.methods.fedit import FedIT
from fedlora.fl.methods.registry import register

OPT_PREFIX = "opt."


def split_state(server: TensorDict) -> tuple[TensorDict, TensorDict]:
    """(adapter, optimizer state without the 'opt.' prefix)."""
    adapter = {k: v for k, v in server.items() if not k.startswith(OPT_PREFIX)}
    opt = {k[len(OPT_PREFIX):]: v for k, v in server.items() if k.startswith(OPT_PREFIX)}
    return adapter, opt


class _ServerOptMethod(FedIT):
    """FedIT whose server applies `server_opt.RULES[name]` to the pseudo-gradient."""

    paper = "arXiv 2003.00295"
    defaults: ClassVar[dict[str, Any]] = {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
                                          "v0": None}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.optimizer = server_opt.RULES[self.name](**self.options)  # validates the options

    def init_server(self, initial: TensorDict) -> TensorDict:
        adapter = clone(initial)
        state = self.optimizer.init(adapter)
        return {**adapter, **{OPT_PREFIX + k: v for k, v in state.items()}}

    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        return split_state(server)[0]

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        adapter, state = split_state(server)
        delta = server_opt.pseudo_gradient(weighted_mean(updates, keys=list(adapter)), adapter)
        # Moments are stored as float32 like the adapter and updated in float64.
        step, state = self.optimizer.update(delta, {k: v.to(torch.float64) for k, v in state.items()})
        adapter = server_opt.apply_step(adapter, step)
        return {**adapter, **{OPT_PREFIX + k: v.to(torch.float32) for k, v in state.items()}}

    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return split_state(server)[0]

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return split_state(server)[0]


@register
class FedAvgM(_ServerOptMethod):
    name = "fedavgm"
    paper = "arXiv 1909.06335"
    defaults = {"server_lr": 1.0, "beta1": 0.9}


@register
class FedAdagrad(_ServerOptMethod):
    name = "fedadagrad"
    defaults = {"server_lr": 1e-2, "beta1": 0.9, "tau": 1e-3, "v0": None}


@register
class FedAdam(_ServerOptMethod):
    name = "fedadam"


@register
class FedYogi(_ServerOptMethod):
    name = "fedyogi"
