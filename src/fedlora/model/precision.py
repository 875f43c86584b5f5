"""Compute precision, gradient checkpointing and k-bit loading: how the model's arithmetic runs.

`model.precision` (ModelConfig) picks the precision of the forward and backward passes:

- 'bf16': the weights stay as loaded (fp32 by default) and every forward runs under
  ``torch.autocast(device, dtype=torch.bfloat16)``: matmuls in bf16, reductions (softmax, norms,
  the loss) in fp32 as autocast's op lists decide. LoRA parameters, their gradients, the AdamW
  moments and every payload stay fp32, so federated arithmetic (averages, DP noise, robust rules)
  never sees bf16. Measured here (SmolLM2-135M, LoRA r=8 on q,v, batch 8 x 130 tokens, AMD EPYC
  with avx512_bf16; docs/benchmarks.md): a training step 1.69x and a scoring forward 2.16x faster
  than fp32. Casting the weights themselves to bf16 instead (model.dtype=bfloat16) was slower on
  this CPU (1.1x), because PEFT's fp32 LoRA branch then costs large dtype copies.
  Training batches of short prompts on a CPU also switch to eager attention (EAGER_TRAIN_MAX_WIDTH).
- 'fp32': no autocast.
- 'auto' (the default): 'bf16' where bf16 arithmetic is fast -- a CUDA GPU with bf16 support, or
  a CPU with avx512_bf16 or AMX tiles -- and 'fp32' elsewhere (older CPUs emulate bf16 slowly,
  and MPS autocast is not relied on).

The choice is stored on the loaded model (`set_compute_precision`) and every forward pass in
fedlora enters `compute_context(model)` (train/batches.py `forward_logits`, synth/lm.py
generation), so training, scoring and generation agree.
"""

from __future__ import annotations

import contextlib

import torch

from fedlora.config.validate import OPTIMIZERS, PRECISIONS, QUANTIZATIONS
from fedlora.model.errors import ModelError

_ATTR = "fedlora_compute_precision"
"""Attribute on the base model (a PeftModel forwards attribute reads to it)."""


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 dot-product units (avx512_bf16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and bool(check()) for check in checks)


def resolve_precision(spec: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for `spec` (one of PRECISIONS) on `device`; a clear error for bad values."""
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise ModelError(f"model.precision={spec!r} is not known; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if spec == "bf16" and not supported:
            raise ModelError("model.precision=bf16 but this GPU has no bfloat16 support; use fp32 or auto")
        return "bf16" if spec == "bf16" or (spec == "auto" and supported) else "fp32"
    if device.type == "cpu":
        return "bf16" if spec == "bf16" or (spec == "auto" and cpu_has_fast_bf16()) else "fp32"
    if spec == "bf16":
        raise ModelError(f"model.precision=bf16 is supported on CPU and CUDA, not {device.type}; use fp32")
    return "fp32"


def set_compute_precision(model: torch.nn.Module, precision: str) -> None:
    """Record the resolved precision ('fp32' or 'bf16') on the model for `compute_context`."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"resolved precision must be 'fp32' or 'bf16', got {precision!r}")
    setattr(model, _ATTR, precision)


def compute_precision(model: torch.nn.Module) -> str:
    """The model's recorded compute precision ('fp32' when none was set, e.g. a model built in a test)."""
    return getattr(model, _ATTR, None) or "fp32"


EAGER_TRAIN_MAX_WIDTH = 256
"""Under bf16 on a CPU, training batches up to this many tokens wide use eager attention.

Measured here (SmolLM2-135M + LoRA, bf16 autocast, batch 8, forward + backward): at 100 tokens
eager attention 0.97 s against SDPA's 1.32 s (SDPA's CPU flash-attention backward was 30 % of a
demo training step), at 400 tokens SDPA 4.72 s against eager 5.82 s. Scoring (no backward) keeps
SDPA, which was as fast or faster at every length. Ours, not a paper's; the width is the crossover
between the two measured lengths."""


@contextlib.contextmanager
def compute_context(model: torch.nn.Module, width: int | None = None):
    """The context every forward pass of `model` runs in: bf16 autocast when the model's precision
    is bf16 (nothing for fp32); for a CPU training pass (grad enabled) over a batch at most
    EAGER_TRAIN_MAX_WIDTH tokens `width`, eager attention in place of SDPA for the block."""
    if compute_precision(model) != "bf16":
        yield
        return
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    swap = (device.type == "cpu" and width is not None and width <= EAGER_TRAIN_MAX_WIDTH
            and torch.is_grad_enabled() and getattr(config, "_attn_implementation", None) == "sdpa")
    if swap:
        config._attn_implementation = "eager"
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    finally:
        if swap:
            config._attn_implementation = "sdpa"


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant, so frozen
    inputs need no requires_grad trick). Active in train mode only, as transformers does it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "set model.gradient_checkpointing=false")
    enable = getattr(model, "activation_checkpointing_enable", None)  # the transformers >= 5.2x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_cuda_only(quantization: str, optimizer: str, device: torch.device) -> None:
    """Refuse k-bit loading and paged 8-bit AdamW where they cannot run: they need CUDA and
    bitsandbytes (an optional install, imported only here and when used)."""
    quantization = (quantization or "none").strip().lower()
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"model.quantization={quantization!r} is not known; use one of {', '.join(QUANTIZATIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ModelError(f"train.optimizer={optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}")
    wanted = [f"model.quantization={quantization}"] if quantization != "none" else []
    wanted += [f"train.optimizer={optimizer}"] if optimizer != "adamw" else []
    if not wanted:
        return
    verb = "needs" if len(wanted) == 1 else "need"
    if device.type != "cuda":
        raise ModelError(f"{' and '.join(wanted)} {verb} a CUDA GPU (bitsandbytes kernels), but the model "
                         f"runs on {device.type}; set model.quantization=none and train.optimizer=adamw "
                         "(on a CPU, model.precision=bf16 is the way to save time)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"{' and '.join(wanted)} {verb} bitsandbytes: pip install bitsandbytes") from exc


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for '4bit' (QLoRA: NF4, double quantization) or '8bit'."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes' PagedAdamW8bit; both over the fp32 LoRA parameters."""
    if name == "paged_adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
