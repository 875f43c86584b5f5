"""Is a model name loadable here, decided in well under a second instead of after a minute.

Offline, ``from_pretrained("org/name")`` retries the Hub with backoff for about a minute per
file before it says the model is missing, and it does so even for a model that sits in the local
Hugging Face cache. So before touching transformers, :func:`check_model_name` sorts a name into
one of: built in (``smollm2-135m``, ``tiny``, ``tiny-lm``), a local path, a Hugging Face id in the
local cache, or a Hugging Face id to download. The last needs the Hub; when it cannot be reached
the name fails at once with the fix, and close matches among the names that would load.

How "offline" is decided (:func:`hub_unreachable`), cheapest first:

1. ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value: the user said so.
2. Otherwise one TCP connect to ``huggingface.co:443`` (``HF_ENDPOINT``'s host when set), run in a
   thread and abandoned after ``PROBE_SECONDS``, because a DNS lookup on a machine with no network
   can hang far longer than the connect timeout itself. The answer is cached for the process:
   it is asked at most once, by `preflight` before the data is loaded, and reused by `load_model`.

A reachable Hub with an unknown id is left to transformers, which answers a 404 quickly.
"""

from __future__ import annotations

import difflib
import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from fedlora.model.errors import ModelError
from fedlora.model.gguf import EMBEDDED, cache_dir

BUILT_IN = (EMBEDDED, "tiny", "tiny-lm")
EMBEDDED_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the embedded model: asking for it offline is answered with the embedded name."""
BUILTIN = "fedlora:"
"""Prefix of the built-in random models' base id ('fedlora:tiny'): built in code, not on the Hub;
the colon makes sure no Hub repository of that name can ever be downloaded in its place."""
PROBE_SECONDS = 1.5
"""Long enough for a TLS-less TCP handshake across continents (~0.3 s), short enough to go unnoticed."""

_TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    return None


def _hub_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when a TCP connect to the Hub succeeds within PROBE_SECONDS, else why not."""
    host, port = _hub_address()
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} cannot be reached ({exc.strerror or exc})")

    worker = threading.Thread(target=connect, daemon=True)  # a hung DNS lookup is left behind
    worker.start()
    worker.join(PROBE_SECONDS)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {PROBE_SECONDS} s"


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None when it can (see the module docstring)."""
    return _env_offline() or _probe()


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_hub_ids() -> list[str]:
    """Hugging Face ids with a downloaded snapshot holding a config.json."""
    root = hf_cache_dir()
    ids = []
    for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
        if any((snap / "config.json").exists() for snap in (repo / "snapshots").glob("*")):
            ids.append(repo.name[len("models--"):].replace("--", "/"))
    return ids


def is_local_path(name: str) -> bool:
    """Written as a path (not an `org/name` id): absolute, relative, home, or with several slashes."""
    return name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _suggest(name: str, known: list[str], cutoff: float) -> str:
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(by_lower[c] for c in close)}?" if close else ""


def check_model_name(name: str) -> bool:
    """Raise ModelError at once for a name that cannot load here; True when it must load offline.

    True means: a Hugging Face id found in the local cache while the Hub cannot be reached, so
    `load_model` reads it with ``local_files_only=True`` instead of retrying the network first.
    """
    name = name.strip()
    if name.lower() in BUILT_IN or name.lower().endswith(".gguf"):
        return False  # load_model says when a .gguf file is missing
    if is_local_path(name):
        if not Path(name).expanduser().exists():
            raise ModelError(f"model directory {name} does not exist; check model.name")
        return False
    if "/" not in name:  # an id is written with its organisation; this is likely a typo of a built-in
        close = _suggest(name, list(BUILT_IN), 0.7)
        if close:
            raise ModelError(f"unknown model name {name!r}{close} (a Hugging Face id is written with its "
                             "organisation, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    cached = cached_hub_ids()
    why = hub_unreachable()
    if why is None:
        return False
    if name in cached:
        return True
    converted = [p.name for p in (cache_dir() / "gguf").glob("*")] if (cache_dir() / "gguf").is_dir() else []
    hint = _suggest(name, [*BUILT_IN, *cached, *converted], 0.6)
    if difflib.SequenceMatcher(None, name.lower(), EMBEDDED_UPSTREAM.lower()).ratio() > 0.8:
        hint = f"; model.name={EMBEDDED} is {EMBEDDED_UPSTREAM}, embedded in fedlora"
    raise ModelError(
        f"model.name={name!r} is not a built-in name, a local directory or a model in the Hugging Face "
        f"cache ({hf_cache_dir()}), and the Hub cannot be used: {why}{hint}\n"
        f"Fix: download it once while online (`hf download {name}`), pass a local directory, or use "
        f"model.name={EMBEDDED} (works offline); `fedlora models` lists what loads here."
    )
