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
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from fedlora.config import LoraConfig

AdapterState = dict[str, torch.Tensor]
TRAIN_MASKS = ("ab", "a", "b", "none")

_PREFIX = "base_model.model."
_ADAPTER = "default"


def _short_name(param_name: str) -> str | None:
    """'base_model.model.x.q_proj.lora_A.default.weight' -> 'x.q_proj.lora_A' (None if not LoRA)."""
    for factor in ("lora_A", "lora_B"):
        suffix = f".{factor}.{_ADAPTER}.weight"
        if param_name.endswith(suffix):
            return param_name[len(_PREFIX) : -len(suffix)] + "." + factor
    return None


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
    """Make only the chosen LoRA factors trainable: 'ab', 'a' (A only), 'b' (B only) or 'none'.

    Base weights are never trainable. Returns the trainable parameters in stable order.
    """
    if mask not in TRAIN_MASKS:
        raise ValueError(f"train mask {mask!r} is not one of {TRAIN_MASKS}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for name, p in adapter_parameters(model).items():
        factor = "a" if name.endswith("lora_A") else "b"
        if factor in mask:
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
    """Write `state` as a standard PEFT adapter directory (loadable with PeftModel.from_pretrained)."""
    load_adapter_state(model, state)
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
