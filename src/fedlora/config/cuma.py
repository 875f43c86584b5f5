"""The `cuma` section: CuMA's mixture of LoRA experts (arXiv 2601.04885; model/cuma.py, docs/cuma.md).

Kept in its own file so `sections.py` stays readable; `RunConfig.cuma` holds it. Defaults are the
paper's (authors' code, Throll/CuMA) unless a field says "ours".
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTINGS = ("topk", "soft")
TOPK_NORMS = ("softmax", "renorm")
PROFILE_SOURCES = ("columns", "client")


@dataclass
class CumaConfig:
    experts: int = 8
    """N LoRA experts per adapted linear (1: plain LoRA, no router)."""
    top_k: int = 2
    """Experts each token uses (routing=topk); 1 <= top_k <= experts."""
    routing: str = "topk"
    """'topk' (the paper) or 'soft' (ablation: every expert, weighted by the full softmax)."""
    topk_norm: str = "softmax"
    """How the k kept probabilities become weights: 'softmax' over them (the authors' code) or
    'renorm' (p_k / sum p_k; ours, the usual Mixtral-style reading of "renormalised")."""
    shared_a: bool = True
    """HydraLoRA: one A shared by the experts, per-expert B (the paper's main setting); false: A_e each."""
    router_hidden: int = 256
    router_layers: int = 2
    """Linear layers in the router MLP (1: a linear router)."""
    router_dropout: float = 0.0
    router_groups: list[list[str]] = field(default_factory=lambda: [["q_proj", "k_proj", "v_proj"],
                                                                    ["gate_proj", "up_proj"]])
    """Sibling modules that read the same input and share one router; others get their own."""
    use_profile: bool = True
    """Route on [h_token ; z]; false: semantic-only routing on h_token (the paper's w/o-demographic ablation)."""
    balance_loss: bool = True
    """Add lambda_aux * sum_routers LB to the loss (false: the paper's w/o-balance ablation)."""
    lambda_aux: float = 0.01
    profile_proj_dim: int | None = None
    """A trainable linear projection of z to this width; None: identity (the paper's default)."""
    profile_source: str = "columns"
    """Federated: 'columns' (each row's profile is its `profile_columns` values) or 'client' (the
    client is one group; its profile text is `client_profile`, formatted with the client id)."""
    profile_columns: list[str] = field(default_factory=list)
    """The demographic columns forming a row's profile text ('col: value; col: value')."""
    client_profile: str = "client {client}"
    """profile_source=client: the profile text of client {client} (ours: the paper has no clients)."""



def validate_cuma(cuma: CumaConfig, method: str) -> None:
    """Range and name checks on the `cuma` section (called by config/validate.py); `method` is fl.method."""
    from fedlora.config.errors import ConfigError

    for key, value, options in (("cuma.routing", cuma.routing, ROUTINGS), ("cuma.topk_norm", cuma.topk_norm, TOPK_NORMS),
                                ("cuma.profile_source", cuma.profile_source, PROFILE_SOURCES)):
        if value not in options:
            raise ConfigError(f"{key}: unknown value {value!r} (choose one of: {', '.join(options)})")
    checks = [
        (cuma.experts >= 1, "cuma.experts must be >= 1 (1 is plain LoRA; the paper uses 8)"),
        (cuma.routing == "soft" or 1 <= cuma.top_k <= cuma.experts,
         f"cuma.top_k={cuma.top_k} must be in [1, cuma.experts={cuma.experts}]; lower cuma.top_k or raise cuma.experts"),
        (cuma.router_hidden >= 1 and cuma.router_layers >= 1, "cuma.router_hidden and cuma.router_layers must be >= 1"),
        (0 <= cuma.router_dropout < 1, "cuma.router_dropout must be in [0, 1)"),
        (cuma.lambda_aux >= 0, "cuma.lambda_aux must be >= 0 (0 or cuma.balance_loss=false turns the balance term off)"),
        (cuma.profile_proj_dim is None or cuma.profile_proj_dim >= 1,
         "cuma.profile_proj_dim must be >= 1, or null for no projection"),
        (method != "cuma" or not cuma.use_profile or cuma.profile_source != "columns" or cuma.profile_columns,
         ("fl.method=cuma routes on each row's profile and cuma.profile_columns is empty; list the demographic "
          "columns (e.g. --set cuma.profile_columns=[age_band]), or set cuma.profile_source=client "
          "(the client is one group) or cuma.use_profile=false (semantic-only routing)")),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    seen: dict[str, int] = {}
    for i, group in enumerate(cuma.router_groups):
        for module in group:
            if module in seen and seen[module] != i:
                raise ConfigError(f"cuma.router_groups: {module} is in two groups; a module shares one router")
            seen[module] = i
