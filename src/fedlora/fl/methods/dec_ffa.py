"""Decentralized FFA-LoRA: A frozen and shared, B trained and gossiped (FFA-LoRA, arXiv 2403.12313,
as TAD-LoRA's decentralized baseline, arXiv 2602.00451).

- Trained on each client: B only. A is drawn once from the run seed, identical on every client,
  and never changes.
- Sent: B only (about half of Dec-LoRA's bytes per edge).
- Mixed: B_i <- sum_j W_ij B_j. With one shared A, sum_j W_ij B_j A = (sum_j W_ij B_j) A, so the
  mix is exact on the product: no cross terms, but also no trained A.
- Options: none.

>>> from fedlora.fl.methods import build_method
>>> m = build_method("dec_ffa")
>>> m.train_mask_at(1), m.sent_at(1)
('b', 'b')
"""

from __future__ import annotations

from fedlora.fl.methods.gossip_base import GossipMethod
from fedlora.fl.methods.registry import register


@register
class DecFFALoRA(GossipMethod):
    name = "dec_ffa"
    paper = "arXiv 2403.12313"
    train_mask = "b"
    sent = "b"
