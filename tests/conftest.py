"""Shared fixtures: small configs on the tiny random model, and one prepared Federation per session.

The session Federation's model is shared and mutable: methods load adapters into it, so a test
must load the adapter it needs and never assume which one is loaded when it starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import load_config, prepare
from fedlora.config import RunConfig
from fedlora.model import build_tiny_model, wrap_lora
from fedlora.model.lora import _short_name

# The tiny model is far faster on one thread: on a busy 2-core machine, torch's intra-op threads
# oversubscribe the cores and a 14 ms training step takes seconds.
torch.set_num_threads(1)

# Seconds-long settings: 120 rows, 5 columns, 3 clients, 2 rounds of 1 local step, 8 eval rows.
TINY_OVERRIDES = [
    "seed=0",
    "model.name=tiny",
    "model.device=cpu",
    "lora.r=4",
    "lora.alpha=8",
    "lora.target_modules=[q_proj, v_proj]",
    "data.source=breast-cancer",
    "data.columns=[mean radius, mean texture, mean perimeter, mean area, mean concave points]",
    "data.max_rows=120",
    "data.max_length=96",
    "partition.scheme=dirichlet",
    "partition.num_clients=3",
    "partition.alpha=1.0",
    "partition.min_rows=5",
    "train.lr=0.005",
    "train.batch_size=4",
    "train.local_steps=1",
    "fl.method=fedit",
    "fl.rounds=2",
    "eval.max_examples=8",
    "eval.batch_size=8",
]


def make_config(*overrides: str, output_dir: str | Path | None = None) -> RunConfig:
    """The tiny config plus `overrides` (later ones win); output_dir (a tmp_path) when given."""
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    return load_config(None, [*TINY_OVERRIDES, *extra, *overrides])


def wrapped_tiny(seed: int = 0, r: int = 4, targets=("q_proj", "v_proj")):
    """A fresh tiny Llama (weights from seed 0) wrapped with LoRA, and its tokenizer."""
    model, tok = build_tiny_model(0)
    cfg = make_config(f"lora.r={r}", f"lora.target_modules=[{', '.join(targets)}]").lora
    return wrap_lora(model, cfg, seed=seed), tok


def base_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every non-LoRA parameter and buffer (to check base weights stay bitwise equal)."""
    out = {name: p.detach().clone() for name, p in model.named_parameters() if _short_name(name) is None}
    out.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names and bitwise-equal values."""
    assert set(a) == set(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def strip_times(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock fields, with NaN made comparable."""
    def clean(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [{k: clean(v) for k, v in row.items() if not k.startswith("time_")} for row in rows]


@pytest.fixture(scope="session")
def tiny_cfg() -> RunConfig:
    return make_config()


@pytest.fixture(scope="session")
def fed(tiny_cfg):
    """One prepared Federation on the tiny model for the whole session (model shared, mutable)."""
    federation = prepare(tiny_cfg)
    assert federation.num_clients == 3
    assert all(len(c.train) > 0 and len(c.test) > 0 for c in federation.clients)
    return federation


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_hub_probe(monkeypatch):
    """Tests never reach the network: the Hub connectivity probe (model/hub.py) answers 'offline'.
    A test of the reachable case patches it back to None."""
    monkeypatch.setattr("fedlora.model.hub._probe", lambda: "huggingface.co:443 cannot be reached (tests)")
