"""Dec-LoRA: plain gossip LoRA (Ghiasvand, Alizadeh, Pedarsani, 2025, arXiv 2501.15361).

- Trained on each client: A and B, its own copy, kept across rounds.
- Sent: A and B to every neighbour of the round's graph.
- Mixed: A_i <- sum_j W_ij A_j and B_i <- sum_j W_ij B_j, each factor separately. The product
  (sum_j W_ij B_j)(sum_k W_ik A_k) carries the cross terms B_j A_k (j != k) that TAD-LoRA
  (arXiv 2602.00451) shows destabilise training on sparse or time-varying graphs.
- Options: none (AdamW state follows train.optimizer_state).

>>> from fedlora.fl.methods import build_method
>>> m = build_method("dec_lora")
>>> m.decentralized, m.train_mask_at(3), m.sent_at(3)
(True, 'ab', 'ab')
"""

from __future__ import annotations

from fedlora.fl.methods.gossip_base import GossipMethod
from fedlora.fl.methods.registry import register


@register
class DecLoRA(GossipMethod):
    name = "dec_lora"
    paper = "arXiv 2501.15361"
    train_mask = "ab"
    sent = "ab"
