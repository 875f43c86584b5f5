"""`ModelError`, raised by every model-loading step (device, cache, GGUF, Hugging Face)."""


class ModelError(RuntimeError):
    """A model cannot be found, converted or placed; the message says how to fix it."""
