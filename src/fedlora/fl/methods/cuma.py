"""CuMA federated: a profile-routed mixture of LoRA experts, averaged across clients (arXiv 2601.04885).

The paper (Sun et al., ACL 2026) is central, not federated; its layer is `model/cuma.py`. Here:

- Trained on each client: every expert (shared A = lora_A, B_0 = lora_B, B_1..B_N-1 = cuma_B,
  and A_1..A_N-1 = cuma_A when A is not shared), every router and the optional profile projection,
  on  CE + lambda_aux sum_routers LB  (the balance term rides on the task loss; model/cuma.py).
  Each row is routed on [h_token ; z(profile)]: z of its demographic columns, or of its client
  (`cuma.profile_source`; fl/cuma_setup.py builds the lookup).
- Sent: all of those tensors, with the example count n_i.
- Combined: FedAvg of each tensor separately, T_bar = sum_i p_i T_i with p_i = n_i / sum_j n_j
  (a weighted mean, so robust chains, DP-FedAvg and stale merging apply as for FedIT).
- Option `personal_routers` (ours; the paper has no federation): routers and projection stay on
  the client (its state across rounds), only experts are sent and averaged; scored per client.

What the paper supports: the expert/router architecture, top-k routing, the balance loss, the
profile encoder. Ours: the federation itself (FedAvg of experts and routers is the natural
reading, not in the paper), personal routers, the client-as-one-group profile. Per-expert
weighting by routing mass is not built yet (docs/cuma.md).

>>> from fedlora.fl.methods import build_method
>>> build_method("cuma").train_mask, build_method("cuma", {"personal_routers": True}).personalized
('abc', True)
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.fl.methods.base import (
    ClientUpdate,
    Method,
    TensorDict,
    clone,
    weighted_mean,
)
from fedlora.fl.methods.registry import register


def _is_router(name: str) -> bool:
    """A router's or the profile projection's tensor (kept local with personal_routers)."""
    return "cuma_router_" in name or name.startswith("cuma_proj")


@register
class CuMA(Method):
    name = "cuma"
    paper = "arXiv 2601.04885"
    train_mask = "abc"
    mean_aggregation = True
    model_layer = "cuma"
    """The engine attaches CuMA's experts and routers while this method runs (fl/cuma_setup.py)."""
    defaults = {"personal_routers": False}

    def __init__(self, **options):
        super().__init__(**options)
        if not isinstance(self.options["personal_routers"], bool):
            raise ValueError("cuma: personal_routers must be true or false")
        self.personal = self.options["personal_routers"]
        self.personalized = self.personal  # scored per client when its routers are its own

    def init_server(self, initial: TensorDict) -> TensorDict:
        return clone({k: v for k, v in initial.items() if not (self.personal and _is_router(k))})

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return clone({k: v for k, v in initial.items() if _is_router(k)}) if self.personal else {}

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return {**received, **client}

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        if not self.personal:
            return trained, client
        return ({k: v for k, v in trained.items() if not _is_router(k)},
                {k: v for k, v in trained.items() if _is_router(k)})

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        return weighted_mean(updates, keys=list(server))

    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return {**server, **client}

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return None if self.personal else server
