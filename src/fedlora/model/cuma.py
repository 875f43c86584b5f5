"""CuMA: a mixture of LoRA experts over PEFT's LoRA layers, routed by token and profile (arXiv 2601.04885).

For an adapted linear with frozen W0, N experts and a router shared by its module group:

    p     = softmax(MLP([h_token ; z]))                    router over N experts, per token
    g     = top-k of p, normalised ('softmax' of the k kept probabilities, as the authors' code
            does, or 'renorm': p_k / sum p_k); soft routing keeps g = p
    y     = W0 x + sum_{e in topk} g_e (alpha / r) B_e A_e x~      (x~: PEFT's LoRA-dropout input)
    LB    = N sum_e freq_e prop_e,  freq_e = #(tokens routing to e) / (tokens * k),
            prop_e = mean g_e over non-pad tokens;   loss = CE + lambda_aux sum_routers LB

HydraLoRA (default, `shared_a`): one A for all experts, per-expert B_e (zero at start). With
`shared_a=False` every expert has its own A_e. Expert 0 *is* PEFT's own branch: A_0 = lora_A,
B_0 = lora_B; experts 1..N-1 live in `<module>.cuma_B` (N-1, d_out, r) and, with independent A,
`<module>.cuma_A` (N-1, r, d_in). So N=1 without a router is plain LoRA exactly, and the PEFT
names, the adapter state and `load_adapter_state` keep working (model/lora.py counts every
`cuma_` parameter as an adapter tensor of kind 'c').

Routers are shared by a module group (`router_groups`: q/k/v one, gate/up one by default; any
other adapted module has its own): siblings that read the same input h. A router is a submodule
`cuma_router_<group>` of their parent (e.g. `model.layers.0.self_attn.cuma_router_q_k_v`) and
runs once per forward: the other members reuse its gates (the same input tensor object).

z is a per-example profile embedding (`set_profile`, or a lookup from the input ids set with
`set_profile_lookup`), optionally through a trainable linear `cuma_proj`. Hooks, as in
`model/mixing.py`: a pre-hook on the LoRA layer sees h, a hook on lora_A sees x~, one on lora_B
returns the mixture (PEFT then scales it by alpha / r).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from fedlora.config.cuma import CumaConfig
from fedlora.model.lora import _ADAPTER, _PREFIX, lora_layers

EXPERT_A, EXPERT_B, ROUTER, PROJ = "cuma_A", "cuma_B", "cuma_router_", "cuma_proj"


# --- the two formulas, as pure functions (tested against hand computations) --------------------

def route(logits: torch.Tensor, top_k: int, routing: str = "topk",
          norm: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(g, selected) from router logits [..., N]: g sums to 1 over the selected experts, 0 elsewhere."""
    p = torch.softmax(logits.float(), dim=-1)
    if routing == "soft":
        return p, torch.ones_like(p, dtype=torch.bool)
    values, index = p.topk(top_k, dim=-1)
    # The authors mask the others to -inf and take a softmax over the kept *probabilities*;
    # 'renorm' is the usual p_k / sum p_k (Mixtral-style). Both are offered; 'softmax' is default.
    kept = torch.softmax(values, dim=-1) if norm == "softmax" else values / values.sum(-1, keepdim=True)
    g = torch.zeros_like(p).scatter(-1, index, kept)
    return g, torch.zeros_like(p, dtype=torch.bool).scatter(-1, index, True)


def balance_loss(g: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LB = N sum_e freq_e prop_e over the tokens where `mask` is 1 (all when None).

    freq_e = #(tokens selecting e) / (tokens * k) carries no gradient (a count); prop_e = mean g_e.
    k is the number selected per token (N under soft routing, where LB = 1: no effect).
    """
    n = g.shape[-1]
    m = torch.ones(g.shape[:-1], device=g.device) if mask is None else mask.to(g.device, torch.float32)
    tokens = m.sum().clamp(min=1.0)
    k = selected.sum(-1).amax().clamp(min=1).float()
    freq = (selected.float() * m[..., None]).flatten(0, -2).sum(0) / (tokens * k)
    prop = (g * m[..., None]).flatten(0, -2).sum(0) / tokens
    return n * (freq * prop).sum()


class _WithAux(torch.autograd.Function):
    """Identity on the gates whose backward also sends d(total)/d(aux) = 1 into `aux`.

    It lets the balance term train the routers through fedlora's one training loop, which only
    back-propagates the task loss: the term rides on the gates' graph (mode 'inject')."""

    @staticmethod
    def forward(ctx, gates, aux):
        ctx.aux_shape = aux.shape
        return gates.view_as(gates)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


class Router(nn.Module):
    """Dropout -> Linear(d + d_z, hidden) -> ReLU -> ... -> Linear(hidden, N): logits per token."""

    def __init__(self, d_in: int, d_profile: int, experts: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        dims = [d_in + d_profile] + [hidden] * (layers - 1) + [experts]
        parts: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            parts += [nn.Dropout(dropout), nn.Linear(a, b)]
            if i < len(dims) - 2:
                parts.append(nn.ReLU())
        self.mlp = nn.Sequential(*parts)

    def forward(self, h: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if z is not None:  # z: [B, d_z], the same for every token of an example
            h = torch.cat([h, z.to(h.dtype)[:, None, :].expand(*h.shape[:-1], z.shape[-1])], dim=-1)
        return self.mlp(h)


class _ExpertHooks:
    """The three hooks on one LoRA layer: gates at the layer, A_e x~ at lora_A, the mix at lora_B."""

    def __init__(self, ctl: CumaController, layer: nn.Module, group: str | None):
        self.ctl, self.layer, self.group = ctl, layer, group
        self.gates = self.rest = None
        self.handles = [layer.register_forward_pre_hook(self._route),
                        layer.lora_A[_ADAPTER].register_forward_hook(self._stash),
                        layer.lora_B[_ADAPTER].register_forward_hook(self._mix)]

    def _route(self, module, args):
        if self.ctl.active:
            self.gates = None if self.group is None else self.ctl.gates(self.group, args[0])

    def _stash(self, module, args, output):
        if self.ctl.active and hasattr(self.layer, EXPERT_A):  # independent A_e: u_e = A_e x~
            self.rest = torch.einsum("...d,erd->...er", args[0], getattr(self.layer, EXPERT_A))

    def _mix(self, module, args, output):
        if not self.ctl.active:
            return output
        u0, gates, rest = args[0], self.gates, self.rest
        self.gates = self.rest = None
        b = module.weight[None]
        if hasattr(self.layer, EXPERT_B):
            b = torch.cat([b, getattr(self.layer, EXPERT_B)], dim=0)       # [N, d_out, r]
        n, d_out, r = b.shape
        u = u0[..., None, :].expand(*u0.shape[:-1], n, r) if rest is None else torch.cat([u0[..., None, :], rest], -2)
        if gates is None:  # one expert, no router: g = 1
            gates = torch.ones(u.shape[:-1], dtype=u.dtype, device=u.device)
        # sum_e g_e B_e u_e as one matmul over the stacked (expert, rank) axis.
        mixed = (gates.to(u.dtype)[..., None] * u).flatten(-2)
        return F.linear(mixed, b.permute(1, 0, 2).reshape(d_out, n * r))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class CumaController:
    """The attached CuMA state of one model: routers, the current profile, the balance terms."""

    def __init__(self, model: nn.Module, cfg: CumaConfig, profile_dim: int):
        self.model, self.cfg, self.profile_dim = model, cfg, profile_dim
        self.routers: dict[str, Router] = {}
        self.hooks: list[_ExpertHooks] = []
        self.active = True
        self.profile: torch.Tensor | None = None
        self.lookup: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
        self.aux_mode = "explicit"
        """'explicit': add `aux_loss(model)` to the loss yourself; 'inject': the balance term is
        back-propagated with the task loss (fedlora's training loop; see `_WithAux`)."""
        self.aux_batch: int | None = None
        """With 'inject': scale each forward's term by its rows / aux_batch (micro-batching)."""
        self.terms: list[torch.Tensor] = []
        self.module_groups: dict[str, str] = {}
        """Adapted module name -> the router group whose gates it uses (routed modules only)."""
        self.mass: dict[str, list] | None = None
        """While tracked (fl/cuma_setup.tracked_routing_mass): per router, [sum of g over the non-pad
        tokens of training forwards, their count]; None: not tracked."""
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._z: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._scale = 1.0

    def begin(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Start of a model forward: clear the gate cache and terms, resolve z for this batch."""
        self._cache, self.terms, self._mask = {}, [], attention_mask
        rows = None if input_ids is None else input_ids.shape[0]
        self._scale = 1.0 if self.aux_batch is None or rows is None else rows / self.aux_batch
        z = self.profile if self.lookup is None or input_ids is None else self.lookup(input_ids, attention_mask)
        if self.cfg.use_profile and self.cfg.experts > 1:
            if z is None:
                raise ValueError("CuMA routes on a profile embedding and none is set: call "
                                 "fedlora.model.cuma.set_profile(model, z) (or cuma.use_profile=false)")
            z = z[None] if z.dim() == 1 else z
            if rows is not None and z.shape[0] != rows:
                if z.shape[0] != 1 and rows % z.shape[0]:
                    raise ValueError(f"CuMA profile batch {z.shape[0]} does not match the input batch {rows}")
                z = z.repeat(rows // z.shape[0], 1) if z.shape[0] > 1 else z.expand(rows, -1)
            proj = getattr(self.model.get_base_model(), PROJ, None)
            self._z = z if proj is None else proj(z.to(proj.weight.device, proj.weight.dtype))
        else:
            self._z = None

    def gates(self, group: str, h: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(group)
        if hit is not None and hit[0] is h:
            return hit[1]
        z = None if self._z is None else self._z.to(h.device)
        g, selected = route(self.routers[group](h, z), self.cfg.top_k, self.cfg.routing, self.cfg.topk_norm)
        mask = None if self._mask is None or self._mask.shape != h.shape[:-1] else self._mask
        if self.cfg.balance_loss:
            term = self.cfg.lambda_aux * balance_loss(g, selected, mask)
            self.terms.append(term)
            if self.aux_mode == "inject" and g.requires_grad:
                g = _WithAux.apply(g, term * self._scale)
        if self.mass is not None and g.requires_grad:  # training forwards only, never evaluation
            m = torch.ones(g.shape[:-1], device=g.device) if mask is None else mask.to(g.device, torch.float32)
            acc = self.mass.setdefault(group, [torch.zeros(g.shape[-1], dtype=torch.float64), 0.0])
            acc[0] += (g.detach().float() * m[..., None]).flatten(0, -2).sum(0).double().cpu()
            acc[1] += float(m.sum())
        self._cache[group] = (h, g)
        return g


def _uniform(shape, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PEFT's A and torch's Linear initial ranges."""
    return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)


def _group_of(leaf: str, groups: list[list[str]]) -> str:
    for group in groups:
        if leaf in group:
            return "_".join(m.removesuffix("_proj") for m in group)
    return leaf.removesuffix("_proj")


def attach_cuma(model, cfg: CumaConfig, seed: int = 0, profile_dim: int | None = None) -> CumaController:
    """Add experts 1..N-1 to every LoRA layer, a router per module group and the optional projection.

    New tensors are drawn on CPU from a generator seeded with `seed` (in sorted name order): B_e = 0,
    A_e and router/projection weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)). `profile_dim` is d_z
    before projection (default: the base model's hidden size, the built-in encoder's width).
    Replaces any earlier attachment.
    """
    detach_cuma(model)
    base = model.get_base_model()
    d_z = int(profile_dim or base.config.hidden_size)
    ctl = CumaController(model, cfg, d_z)
    gen = torch.Generator().manual_seed(int(seed))
    layers = lora_layers(model)
    n = cfg.experts
    if cfg.use_profile and cfg.profile_proj_dim and n > 1:
        proj = nn.Linear(d_z, cfg.profile_proj_dim)
        with torch.no_grad():
            proj.weight.copy_(_uniform(proj.weight.shape, d_z, gen))
            proj.bias.copy_(_uniform(proj.bias.shape, d_z, gen))
        base.add_module(PROJ, proj.to(next(base.parameters()).device))
    d_route = (cfg.profile_proj_dim or d_z) if cfg.use_profile else 0
    for name, layer in layers.items():
        parent_name, leaf = name.rsplit(".", 1)
        a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
        group = None
        if n > 1:
            group = f"{parent_name}.{ROUTER}{_group_of(leaf, cfg.router_groups)}"
            if group not in ctl.routers:
                router = Router(a.shape[1], d_route, n, cfg.router_hidden, cfg.router_layers, cfg.router_dropout)
                with torch.no_grad():
                    for linear in (m for m in router.mlp if isinstance(m, nn.Linear)):
                        linear.weight.copy_(_uniform(linear.weight.shape, linear.in_features, gen))
                        linear.bias.copy_(_uniform(linear.bias.shape, linear.in_features, gen))
                model.get_submodule(_PREFIX + parent_name).add_module(group.rsplit(".", 1)[1], router.to(a.device))
                ctl.routers[group] = router
            elif ctl.routers[group].mlp[1].in_features != a.shape[1] + d_route:
                raise ValueError(f"cuma.router_groups: {leaf} shares a router with modules of another input "
                                 "width; list only modules that read the same input in one group")
            ctl.module_groups[name] = group
            layer.register_parameter(EXPERT_B, nn.Parameter(torch.zeros(n - 1, *b.shape, device=b.device)))
            if not cfg.shared_a:
                init = _uniform((n - 1, *a.shape), a.shape[1], gen).to(a.device, a.dtype)
                layer.register_parameter(EXPERT_A, nn.Parameter(init))
        ctl.hooks.append(_ExpertHooks(ctl, layer, group))
    ctl.hooks.append(base.register_forward_pre_hook(_begin_hook(ctl), with_kwargs=True))
    model._fedlora_cuma = ctl
    return ctl


def _begin_hook(ctl: CumaController):
    def hook(module, args, kwargs):
        if ctl.active:
            ids = kwargs.get("input_ids", args[0] if args else None)
            ctl.begin(ids, kwargs.get("attention_mask"))
    return hook


def detach_cuma(model) -> None:
    """Remove hooks, experts 1..N-1, routers and the projection; the model is plain PEFT again."""
    ctl = getattr(model, "_fedlora_cuma", None)
    if ctl is None:
        return
    for hook in ctl.hooks:
        hook.remove()
    for layer in lora_layers(model).values():
        for attr in (EXPERT_A, EXPERT_B):
            layer._parameters.pop(attr, None)
    for group in ctl.routers:
        parent, child = group.rsplit(".", 1)
        del model.get_submodule(_PREFIX + parent)._modules[child]
    model.get_base_model()._modules.pop(PROJ, None)
    model._fedlora_cuma = None


def cuma_controller(model) -> CumaController | None:
    return getattr(model, "_fedlora_cuma", None)


def set_profile(model, z: torch.Tensor | None) -> None:
    """The profile embedding(s) for the next forwards: [B, d_z] per example, or [d_z] for all."""
    _require(model).profile = z


def set_profile_lookup(model, lookup) -> None:
    """A callable (input_ids, attention_mask) -> z [B, d_z] resolving each row's profile (or None)."""
    _require(model).lookup = lookup


def aux_loss(model) -> torch.Tensor:
    """lambda_aux * sum over routers of LB, from the last forward (0 without balance terms)."""
    terms = _require(model).terms
    return torch.stack(terms).sum() if terms else torch.zeros(())


@contextmanager
def cuma_paused(model):
    """Within the block the CuMA hooks do nothing (e.g. while the frozen base encodes profiles)."""
    ctl = cuma_controller(model)
    saved = None if ctl is None else ctl.active
    if ctl is not None:
        ctl.active = False
    try:
        yield
    finally:
        if ctl is not None:
            ctl.active = saved


def _require(model) -> CumaController:
    ctl = cuma_controller(model)
    if ctl is None:
        raise ValueError("the model has no CuMA layer; call fedlora.model.cuma.attach_cuma(model, cfg) first")
    return ctl
