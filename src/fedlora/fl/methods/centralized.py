"""Centralized training on the pooled data: the upper reference that federation cannot reach.

The engine replaces the clients by one virtual client holding every client's training rows (a
thing no real federation may do) and gives it as many local steps per round as all sampled
clients would take together, so compute per round matches FedIT. Scored like a global method:
on every client's own test split and on the global test.
- Trained: A and B. Sent: A and B (one client). Combined: the single update is the new adapter.
"""

from __future__ import annotations

from fedlora.fl.methods.fedit import FedIT
from fedlora.fl.methods.registry import register


@register
class Centralized(FedIT):
    name = "centralized"
    paper = ""
    pooled = True
