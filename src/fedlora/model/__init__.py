"""Model loading and LoRA wrapping, with adapter state as named tensors."""

from fedlora.model.load import (
    EMBEDDED,
    ModelError,
    build_tiny_lm,
    build_tiny_model,
    cache_dir,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
)
from fedlora.model.export import base_model_id, export_merged, save_adapters
from fedlora.model.lora import (
    AdapterState,
    adapter_parameters,
    adapter_state,
    init_adapter_state,
    load_adapter_state,
    save_peft_adapter,
    set_trainable,
    wrap_lora,
)

__all__ = [
    "EMBEDDED", "AdapterState", "ModelError", "adapter_parameters", "adapter_state", "base_model_id", "build_tiny_lm",
    "build_tiny_model", "export_merged", "save_adapters",
    "cache_dir", "init_adapter_state", "list_models", "load_adapter_state", "load_model",
    "resolve_device", "resolve_dtype", "save_peft_adapter", "set_trainable", "wrap_lora",
]
