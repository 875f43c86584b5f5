"""FedProx on the adapter: FedIT plus a proximal term in the local loss (Li et al., arXiv 1812.06127).

- Trained on each client: the trainable adapter tensors w (A and B), on
      loss(w) + (mu / 2) * sum_k ||w_k - w_global_k||^2,
  the sum over the trainable adapter tensors, with w_global what the client received this round.
  The term pulls local training back toward the global adapter, limiting client drift under
  heterogeneous data. Its gradient mu (w - w_global) is zero at the first local step (w starts at
  w_global), so with one local step per round FedProx is FedIT.
- Sent and combined: as FedIT (A_bar = sum_i p_i A_i, B_bar = sum_i p_i B_i).
- Options: mu (default 0.01, >= 0). The paper tunes mu over {0.001, 0.01, 0.1, 1} per task; 0.01
  is a mild pull. mu = 0 adds no term at all and is FedIT bit for bit. The term is on the factors
  A and B, not on the product B A (the paper's w is the whole model; here only the adapter trains).

>>> import torch
>>> from fedlora.fl.methods import build_method
>>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
>>> term = build_method("fedprox", {"mu": 2.0}).extra_loss({"w": w}, {"w": torch.zeros(2)})
>>> term().item()  # (2 / 2) * (9 + 16)
25.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedlora.fl.methods.base import TensorDict
from fedlora.fl.methods.fedit import FedIT
from fedlora.fl.methods.registry import register


@register
class FedProx(FedIT):
    name = "fedprox"
    paper = "arXiv 1812.06127"
    defaults = {"mu": 0.01}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not float(self.options["mu"]) >= 0:
            raise ValueError(f"fedprox: mu must be >= 0, got {self.options['mu']}")

    def extra_loss(self, params: dict[str, torch.nn.Parameter],
                   received: TensorDict) -> Callable[[], torch.Tensor] | None:
        mu = float(self.options["mu"])
        # Anchors moved to the parameters' device once per round, not once per step.
        pairs = [(p, received[k].to(p.device, torch.float32)) for k, p in params.items()
                 if p.requires_grad and k in received]
        if mu == 0 or not pairs:
            return None

        def proximal() -> torch.Tensor:
            return (mu / 2) * sum((p.float() - g).square().sum() for p, g in pairs)

        return proximal
