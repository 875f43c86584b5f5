"""FedIT: FedAvg of both LoRA factors (Zhang et al., "Towards Building the FederatedGPT", arXiv 2305.05644).

- Trained on each client: A and B, starting from the global (A_bar, B_bar).
- Sent: A_i and B_i, with the client's example count n_i.
- Combined: A_bar = sum_i p_i A_i and B_bar = sum_i p_i B_i with p_i = n_i / sum_j n_j, each factor
  averaged separately. This is not the average of the products: sum_i p_i B_i A_i != B_bar A_bar in
  general; the gap (the "cross terms") is what FFA-LoRA and FLoRA remove.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, weighted_mean
from fedlora.fl.methods.registry import register


@register
class FedIT(Method):
    name = "fedit"
    paper = "arXiv 2305.05644"
    mean_aggregation = True

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        return weighted_mean(updates, keys=list(server))
