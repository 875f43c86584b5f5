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
- Option `expert_weights` (ours): 'examples' (default, the FedAvg above) or 'routing_mass': each
  client also sends, per routed module, its routing mass m_i (m_ie = mean gate of expert e over
  its training tokens, sum_e m_ie = 1), and expert e's own tensors (B_e, and A_e when A is not
  shared) are combined with weights n_i m_ie / sum_j n_j m_je, so a client that never routed to
  an expert does not pull it toward its untouched copy. The shared A, routers and projection keep
  n_i weights; an expert no client routed to keeps n_i weights. The masses are a side channel,
  so robust chains, attacks, worker momentum and DP are refused with it (their guarantees are for
  one weighted mean with data-independent weights).

What the paper supports: the expert/router architecture, top-k routing, the balance loss, the
profile encoder. Ours: the federation itself (FedAvg of experts and routers is the natural
reading, not in the paper), personal routers, the client-as-one-group profile, routing-mass
weights (docs/cuma.md).

>>> from fedlora.fl.methods import build_method
>>> build_method("cuma").train_mask, build_method("cuma", {"personal_routers": True}).personalized
('abc', True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.fl.methods.base import (
    ClientUpdate,
    Method,
    TensorDict,
    clone,
    weighted_mean,
)
from fedlora.fl.methods.registry import register

ROUTING_MASS = "routing_mass."
"""Payload prefix of a module's routing mass, 'routing_mass.<module>' (a [N] vector)."""
EXPERT_WEIGHTS = ("examples", "routing_mass")


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
    defaults = {"personal_routers": False, "expert_weights": "examples"}

    def __init__(self, **options):
        super().__init__(**options)
        if not isinstance(self.options["personal_routers"], bool):
            raise ValueError("cuma: personal_routers must be true or false")
        if self.options["expert_weights"] not in EXPERT_WEIGHTS:
            raise ValueError(f"cuma: expert_weights must be one of {', '.join(EXPERT_WEIGHTS)}, "
                             f"not {self.options['expert_weights']!r}")
        self.personal = self.options["personal_routers"]
        self.personalized = self.personal  # scored per client when its routers are its own
        self.sends_routing_mass = self.options["expert_weights"] == "routing_mass"
        """The client runtime records the routing mass of local training (fl/cuma_setup.py)."""
        self.side_channels = (ROUTING_MASS,) if self.sends_routing_mass else ()
        self.side_channels_hint = " (fl.method_args.expert_weights=routing_mass; set it to 'examples')"

    def init_server(self, initial: TensorDict) -> TensorDict:
        return clone({k: v for k, v in initial.items() if not (self.personal and _is_router(k))})

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return clone({k: v for k, v in initial.items() if _is_router(k)}) if self.personal else {}

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return {**received, **client}

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        mass = {k: v for k, v in trained.items() if k.startswith(ROUTING_MASS)}
        trained = {k: v for k, v in trained.items() if k not in mass}
        sent, own = trained, client
        if self.personal:
            sent = {k: v for k, v in trained.items() if not _is_router(k)}
            own = {k: v for k, v in trained.items() if _is_router(k)}
        if self.sends_routing_mass:  # uniform before any training (the schema's initial upload)
            sent = {**sent, **(mass or _uniform_mass(trained))}
        return sent, own

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        out = weighted_mean(updates, keys=list(server))
        return _mass_weighted(out, updates) if self.sends_routing_mass else out

    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return {**server, **client}

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return None if self.personal else server


def _uniform_mass(tensors: TensorDict) -> TensorDict:
    """1/N for every expert of every routed module (a module with experts has a `cuma_B`)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".cuma_B"):
            n = value.shape[0] + 1
            out[ROUTING_MASS + key.removesuffix(".cuma_B")] = torch.full((n,), 1.0 / n)
    return out


def _mass_weighted(out: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
    """`out` with every expert's own tensors re-combined with weights n_i m_ie / sum_j n_j m_je."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    for key in updates[0].tensors:
        if not key.startswith(ROUTING_MASS):
            continue
        module = key.removeprefix(ROUTING_MASS)
        # A peer's mass is clamped and normalised: it can move its n_i between experts, never inflate it.
        m = torch.stack([u.tensors[key].to(torch.float64).clamp(min=0) for u in updates])
        total = m.sum(1, keepdim=True)
        m = torch.where(total > 0, m / total.clamp(min=1e-300), torch.full_like(m, 1.0 / m.shape[1]))
        w = m * n[:, None]
        w = torch.where(w.sum(0) > 0, w, n[:, None].expand_as(w))  # no client routed to e: example weights
        w = w / w.sum(0)
        own_a = f"{module}.cuma_A" in out  # independent A: lora_A is expert 0's own
        for name, cols in ((f"{module}.lora_B", 0), (f"{module}.cuma_B", slice(1, None)),
                           (f"{module}.lora_A" if own_a else None, 0), (f"{module}.cuma_A", slice(1, None))):
            if name not in out:
                continue
            acc = torch.zeros_like(out[name], dtype=torch.float64)
            for i, u in enumerate(updates):
                wi = w[i, cols]
                wi = wi.reshape(-1, *([1] * (out[name].dim() - 1))) if wi.dim() else wi
                acc += wi * u.tensors[name].to(torch.float64)
            out[name] = acc.to(torch.float32)
    return out
