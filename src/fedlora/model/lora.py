"""LoRA through PEFT, with adapter state as plain named tensors.

The simulator keeps one PEFT-wrapped model and many clients' adapter states. A client's state is a
dict `{name: tensor}` with short, stable names such as
`model.layers.0.self_attn.q_proj.lora_A` (PEFT's parameter name without the `base_model.model.`
prefix and the `.default.weight` suffix). Swapping a client in copies tensors into the live
parameters (`load_adapter_state`); the model is never re-wrapped, so a swap costs a memcpy of the
adapter (a few MB), not a model rebuild.

Each adapted linear layer computes  h = W0 x + (alpha / r) * B A x,  with A in R^{r x d_in}
(Kaiming-uniform, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))) and B in R^{d_out x r} (zeros).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from fedlora.config import LoraConfig

AdapterState = dict[str, torch.Tensor]
TRAIN_MASKS = ("ab", "a", "b", "abm", "abc", "none")
_MIXING = (".mix_ext_A", ".mix_ext_B", ".mix_logit")
_CUMA = "cuma_"  # CuMA's extra experts, routers and projection (model/cuma.py)

_PREFIX = "base_model.model."
_ADAPTER = "default"


def _short_name(param_name: str) -> str | None:
    """'base_model.model.x.q_proj.lora_A.default.weight' -> 'x.q_proj.lora_A' (None if not adapter).

    The mixing layer's tensors (`model/mixing.py`: 'x.q_proj.mix_ext_A', 'x.q_proj.mix_ext_B',
    'model.layers.3.mix_logit') are adapter tensors too while it is attached, and so are CuMA's
    (`model/cuma.py`: 'x.q_proj.cuma_B', 'model.layers.0.self_attn.cuma_router_q_k_v.mlp.1.weight').
    """
    for factor in ("lora_A", "lora_B"):
        suffix = f".{factor}.{_ADAPTER}.weight"
        if param_name.endswith(suffix):
            return param_name[len(_PREFIX) : -len(suffix)] + "." + factor
    if param_name.startswith(_PREFIX) and (param_name.endswith(_MIXING) or _CUMA in param_name):
        return param_name[len(_PREFIX) :]
    return None


def _kind(name: str) -> str:
    """'a', 'b' (LoRA factors), 'c' (CuMA experts/routers), 'm' (mixing weight) or 'x' (frozen external branch)."""
    if _CUMA in name:
        return "c"
    if name.endswith("lora_A"):
        return "a"
    if name.endswith("lora_B"):
        return "b"
    return "m" if name.endswith("mix_logit") else "x"


def wrap_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> PeftModel:
    """Wrap `model` with LoRA on `cfg.target_modules`; base weights frozen; A and B seeded."""
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # PEFT reads a property that transformers 5 deprecated; harmless, and not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ValueError(
            f"LoRA could not wrap the model: {exc}. Check lora.target_modules "
            f"(got {cfg.target_modules}); Llama-style models use q_proj,k_proj,v_proj,o_proj,"
            "gate_proj,up_proj,down_proj."
        ) from exc
    load_adapter_state(peft_model, init_adapter_state(peft_model, seed))
    return peft_model


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Live LoRA parameters by short name, in a stable (sorted) order."""
    found = {}
    for name, param in model.named_parameters():
        short = _short_name(name)
        if short is not None:
            found[short] = param
    if not found:
        raise ValueError("the model has no LoRA parameters; wrap it with wrap_lora() first")
    return dict(sorted(found.items()))


def adapter_state(model: PeftModel, device: str | torch.device = "cpu") -> AdapterState:
    """A detached fp32 copy of the adapter, by short name (on `device`, CPU by default)."""
    return {
        name: p.detach().to(device=device, dtype=torch.float32, copy=True)
        for name, p in adapter_parameters(model).items()
    }


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: AdapterState, strict: bool = True) -> None:
    """Copy `state` into the live parameters (no re-wrapping). Strict: keys and shapes must match."""
    params = adapter_parameters(model)
    if strict and set(state) != set(params):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise KeyError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    # Check everything before copying anything, so a bad state never half-overwrites the model.
    for name, tensor in state.items():
        if name not in params:
            raise KeyError(f"unknown adapter tensor {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(params[name].shape)}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def set_trainable(model: PeftModel, mask: str = "ab") -> list[torch.nn.Parameter]:
    """Make only the chosen LoRA factors trainable: 'ab', 'a' (A only), 'b' (B only), 'abm' (A, B
    and the mixing weights of `model/mixing.py`), 'abc' (A, B and CuMA's experts and routers) or 'none'.

    Base weights and a mixing layer's external branch are never trainable. Returns the trainable
    parameters in stable order.
    """
    if mask not in TRAIN_MASKS:
        raise ValueError(f"train mask {mask!r} is not one of {TRAIN_MASKS}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for name, p in adapter_parameters(model).items():
        if _kind(name) in mask:
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


def init_adapter_state(model: PeftModel, seed: int, rank: int | None = None) -> AdapterState:
    """A fresh adapter: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's default), B = 0.

    Drawn on CPU from a generator seeded with `seed`, in sorted name order, so the same seed gives
    the same A on every client and machine (FFA-LoRA relies on this). `rank` overrides the rank
    (for methods with per-client ranks); by default the model's own shapes are used.
    """
    gen = torch.Generator().manual_seed(int(seed))
    state = {}
    for name, p in adapter_parameters(model).items():
        if _kind(name) not in "ab":
            continue  # a mixing layer's tensors are set by the method that attached it
        shape = list(p.shape)
        if rank is not None:
            shape[0 if name.endswith("lora_A") else 1] = rank
        if name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(shape[1])
            state[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            state[name] = torch.zeros(shape)
    return state


def lora_scaling(cfg: LoraConfig) -> float:
    """s = alpha / r, the factor in front of B A."""
    return cfg.alpha / cfg.r


def save_peft_adapter(model: PeftModel, state: AdapterState, path: str | Path) -> Path:
    """Write `state` as a standard PEFT adapter directory (loadable with PeftModel.from_pretrained).

    PEFT records the model's `_name_or_path` as the base (a cache path for the embedded model, None
    for tiny); a run's own outputs use `model/export.save_adapters`, which names the real base."""
    load_adapter_state(model, state)
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


# --- the base weights under the adapters, and per-client ranks (FLoRA) ---------------------------


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers by module name, e.g. 'model.layers.0.self_attn.q_proj' (sorted).

    A module's adapter tensors are named '<module>.lora_A' and '<module>.lora_B'.
    """
    found = {name[len(_PREFIX):]: m for name, m in model.named_modules()
             if isinstance(m, LoraLayer) and name.startswith(_PREFIX)}
    if not found:
        raise ValueError("the model has no LoRA layers; wrap it with wrap_lora() first")
    return dict(sorted(found.items()))


def base_weights(model: PeftModel, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies (same dtype, so restoring them is bitwise exact) of the named LoRA layers' W0."""
    layers = lora_layers(model)
    return {n: layers[n].get_base_layer().weight.detach().to("cpu", copy=True) for n in (names or layers)}


@torch.no_grad()
def set_base_weights(model: PeftModel, weights: Mapping[str, torch.Tensor],
                     delta: Mapping[str, torch.Tensor] | None = None) -> None:
    """W = weights[n] + (alpha / r) * delta[n] for each named LoRA layer; W = weights[n] without delta.

    `delta` is in the adapter's units (like B A), so the layer's own alpha / r scales it; the sum is
    taken in fp32 and cast to W's dtype. Without `delta` the copy is bitwise (a restore).
    """
    layers = lora_layers(model)
    for name, w0 in weights.items():
        layer = layers[name]
        weight = layer.get_base_layer().weight
        if weight.shape != w0.shape:
            raise ValueError(f"{name}: base weight shape {tuple(weight.shape)} != {tuple(w0.shape)}")
        if delta is None:
            weight.copy_(w0)
            continue
        scaling = layer.lora_alpha[_ADAPTER] / layer.r[_ADAPTER]
        merged = w0.to(weight.device, torch.float32) + scaling * delta[name].to(weight.device, torch.float32)
        weight.copy_(merged.to(weight.dtype))


def zero_pad_rank(state: AdapterState, rank: int) -> AdapterState:
    """A rank-`rank` adapter inside the model's rank-r shapes: rows of A and columns of B from `rank` on are 0.

    Training keeps them at 0: the gradient of A[j] is s B[:, j]^T g x^T and that of B[:, j] is
    s g (A[j] x)^T, both zero while A[j] = 0 and B[:, j] = 0 (and AdamW moves a zero-gradient zero
    by nothing: decoupled decay of 0 is 0, and the Adam step is 0 / (0 + eps)).
    """
    out = {}
    for name, t in state.items():
        t = t.clone()
        if name.endswith("lora_A"):
            t[rank:, :] = 0
        else:
            t[:, rank:] = 0
        out[name] = t
    return out


@contextmanager
def rank_scaling(model: PeftModel, rank: int | None) -> Iterator[None]:
    """Within the block every LoRA layer computes (alpha / rank) B A instead of (alpha / r) B A.

    With `zero_pad_rank` this makes the shared rank-r model train exactly a rank-`rank` LoRA with
    the same lora_alpha. The layers' scalings are restored on exit, also on error. None: no change.
    """
    if rank is None:
        yield
        return
    layers = lora_layers(model)
    saved = {name: layer.scaling[_ADAPTER] for name, layer in layers.items()}
    try:
        for layer in layers.values():
            if not 0 < rank <= layer.r[_ADAPTER]:
                raise ValueError(f"rank {rank} must be in [1, {layer.r[_ADAPTER]}] (the model's lora.r)")
            layer.scaling[_ADAPTER] = layer.lora_alpha[_ADAPTER] / rank
        yield
    finally:
        for name, layer in layers.items():
            layer.scaling[_ADAPTER] = saved[name]
