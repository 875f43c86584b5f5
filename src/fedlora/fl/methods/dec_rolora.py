"""RoLoRA-style alternation over a graph, mixing only the active factor (the degrading baseline).

RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755) alternates B-only and A-only rounds with a
server. Carried naively to gossip, as ADF-LoRA / TAD-LoRA (arXiv 2511.18291, 2602.00451) do for
their baseline:
- Trained: the active factor of the round, B first: phase(t) = 'b' if floor((t-1)/T) is even.
- Sent and mixed: only the active factor. The frozen factor is never mixed, so clients' frozen
  factors drift apart and the next phase trains against mismatched partners (ADF-LoRA's DFL
  table: RoLoRA 0.8284 < Dec-LoRA 0.8458). TAD-LoRA fixes this by mixing both.
- Options: interval (T, default 1 = RoLoRA's per-round alternation; an integer >= 1),
  reset_optimizer (default True: a fresh AdamW each round, as the reproduction does; the moments
  of one factor never meet the other).

>>> from fedlora.fl.methods import build_method
>>> m = build_method("dec_rolora")
>>> [(m.train_mask_at(t), m.sent_at(t)) for t in (1, 2, 3)]
[('b', 'b'), ('a', 'a'), ('b', 'b')]
"""

from __future__ import annotations

from fedlora.fl.methods.gossip_base import GossipMethod, phase
from fedlora.fl.methods.registry import register


@register
class DecRoLoRA(GossipMethod):
    name = "dec_rolora"
    paper = "arXiv 2502.01755"
    train_mask = "b"  # of round 1; train_mask_at gives the round's
    defaults = {"interval": 1, "reset_optimizer": True}

    def __init__(self, **options):
        super().__init__(**options)
        interval = self.options["interval"]
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"dec_rolora: option 'interval' must be an integer >= 1, got {interval!r}")

    def train_mask_at(self, round_index: int) -> str:
        return phase(round_index, self.options["interval"])

    def sent_at(self, round_index: int) -> str:
        return phase(round_index, self.options["interval"])
