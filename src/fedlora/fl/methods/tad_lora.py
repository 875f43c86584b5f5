"""TAD-LoRA: topology-aware alternating LoRA over a graph (Wang, Li, Zhou, Li, Liu; arXiv 2602.00451).

Gossip mixing the factors separately gives (sum_j W_ij B_j)(sum_k W_ik A_k), whose cross terms
B_j A_k (j != k) grow with the graph's sparsity. TAD-LoRA trains one factor at a time on a
schedule common to all clients and keeps both factors consensual:
- Trained: the active factor only, the other frozen during local steps. Round t (1-based) is a
  B round when floor((t - 1) / T) is even (B first; A random and shared, B = 0 at the start).
- Sent and mixed: BOTH factors every round, X_i <- sum_j W_ij X_j for X in {A, B}: the frozen
  factor stays in consensus, so no client starts a phase against mismatched partners (which is
  what breaks the naive RoLoRA extension, `dec_rolora`).
- Switching interval: T* ~ 1 / sqrt(1 - rho), rho the mixing rate (1 - spectral gap of
  E[W^T W]): sparser graphs want longer phases. interval='auto' sets T = ceil(c / sqrt(1 - rho))
  from the run's topology (fl/topology.py), capped at fl.rounds; c = interval_constant. c = 1 gives
  T = 5 on ADF-LoRA's pairwise graph (10 clients, q = 0.1, rho ~ 0.95), the T its ablation found
  best (arXiv 2511.18291); the paper states only the order, so c is a knob.
- Options: interval (default 5, ADF-LoRA's best fixed T; an integer >= 1 or 'auto'),
  interval_constant (c, default 1.0, > 0), reset_optimizer (default True: a fresh AdamW every
  round, as the reproduction does; False keeps one AdamW state per factor per client when
  train.optimizer_state=keep). With T >= fl.rounds only B is ever trained and TAD-LoRA equals
  decentralized FFA-LoRA (`dec_ffa`), plus the bytes of the unchanged A (tested).

>>> from fedlora.fl.methods import build_method
>>> m = build_method("tad_lora", {"interval": 2})
>>> [m.train_mask_at(t) for t in range(1, 6)], m.sent_at(3)
(['b', 'b', 'a', 'a', 'b'], 'ab')
"""

from __future__ import annotations

from fedlora.fl.methods.gossip_base import GossipMethod, auto_interval, check_interval, phase
from fedlora.fl.methods.registry import register


@register
class TADLoRA(GossipMethod):
    name = "tad_lora"
    paper = "arXiv 2602.00451"
    train_mask = "b"  # of round 1; train_mask_at gives the round's
    sent = "ab"
    defaults = {"interval": 5, "interval_constant": 1.0, "reset_optimizer": True}

    def __init__(self, **options):
        super().__init__(**options)
        check_interval(self.name, self.options["interval"])
        c = self.options["interval_constant"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"tad_lora: option 'interval_constant' must be a number > 0, got {c!r}")

    def train_mask_at(self, round_index: int) -> str:
        interval = self.options["interval"]
        if interval == "auto":
            raise ValueError("tad_lora: interval='auto' must be resolved from the topology first "
                             "(GossipSimulator does it; or call for_topology(rho, rounds))")
        return phase(round_index, interval)

    def for_topology(self, rho: float, rounds: int) -> TADLoRA:
        if self.options["interval"] != "auto":
            return self
        interval = auto_interval(rho, float(self.options["interval_constant"]), rounds)
        return type(self)(**{**self.options, "interval": interval})
