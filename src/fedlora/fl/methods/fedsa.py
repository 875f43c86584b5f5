"""FedSA-LoRA: share A, keep B personal (Guo et al., ICLR 2025, arXiv 2410.01463).

- Trained on each client: A and B, starting from (A_bar, its own B_i).
- Sent: A only, both ways. B never leaves the client; it is the client's state across rounds
  (the authors' config: `personalization.local_param: ['lora_B', ...]`).
- Combined: A_bar = sum_i p_i A_i, p_i = n_i / sum_j n_j.
- Scored per client with (A_bar, B_i) (personalized); there is no global adapter, since a B
  averaged over clients was never trained against anything.
- Rationale (paper): A learns what clients share, B what is client-specific.
- Options: none. Every B_i starts at the run's initial B (zeros).

>>> import torch
>>> from fedlora.fl.methods import build_method
>>> m = build_method("fedsa")
>>> list(m.init_server({"l.lora_A": torch.ones(1, 2), "l.lora_B": torch.zeros(2, 1)}))
['l.lora_A']
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, clone, factor, weighted_mean
from fedlora.fl.methods.registry import register


@register
class FedSALoRA(Method):
    name = "fedsa"
    paper = "arXiv 2410.01463"
    personalized = True
    mean_aggregation = True

    def init_server(self, initial: TensorDict) -> TensorDict:
        return clone(factor(initial, "lora_A"))

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return clone(factor(initial, "lora_B"))

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return {**received, **client}

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        return factor(trained, "lora_A"), factor(trained, "lora_B")

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        return weighted_mean(updates, keys=list(server))

    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return {**server, **client}

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return None
