"""FFA-LoRA: freeze A, train and average B only (Sun et al., ICLR 2024, arXiv 2403.12313).

- Trained on each client: B only (train_mask 'b'). A is drawn once from the run seed, identical on
  every client, and never changes (the engine's `initial` adapter is the same for everyone, since
  `init_adapter_state` draws A from a generator seeded with the run seed).
- Sent: B both ways. The client keeps its copy of the shared A as client state (a real client
  regenerates it from the seed) and rebuilds its full adapter as (its A, received B).
- Combined: B_bar = sum_i p_i B_i, p_i = n_i / sum_j n_j. The server keeps A only to score and
  export the global adapter.
- Exact: with one shared A, sum_i p_i B_i A = (sum_i p_i B_i) A = B_bar A, so averaging the factor
  is averaging the update (no FedIT cross terms). About half of FedIT's bytes each way (B's share
  of the adapter: r x d_out per layer against r x (d_in + d_out)).
- Options: none. The paper pairs a frozen A with a larger LoRA scaling alpha; set `lora.alpha`.

>>> import torch
>>> from fedlora.fl.methods import ClientUpdate, build_method
>>> m = build_method("ffa")
>>> server = m.init_server({"l.lora_A": torch.ones(1, 2), "l.lora_B": torch.zeros(2, 1)})
>>> list(m.download(server, 0))
['l.lora_B']
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, clone, factor, weighted_mean
from fedlora.fl.methods.registry import register


@register
class FFALoRA(Method):
    name = "ffa"
    paper = "arXiv 2403.12313"
    train_mask = "b"
    mean_aggregation = True

    def init_server(self, initial: TensorDict) -> TensorDict:
        return clone(initial)

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return clone(factor(initial, "lora_A"))  # the shared, frozen A

    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        return factor(server, "lora_B")

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return {**client, **received}

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        return factor(trained, "lora_B"), client

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        return {**server, **weighted_mean(updates, keys=list(factor(server, "lora_B")))}
