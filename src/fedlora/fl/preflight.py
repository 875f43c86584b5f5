"""Checks of a run config that need the fl modules, run before any expensive work.

`fedlora.config` validates types and values on its own and imports nothing else from fedlora.
What it cannot know lives here: whether the topology graph can be built on the configured
clients (`fl/topology.py`), whether `robust.attack` names a registered attack (`fl/attacks.py`),
and whether model.name can load here (`model/hub.py`). `preflight(cfg)` raises `ConfigError`
naming the key (`ModelError` for the model); `prepare()` calls it first, and so does the command
line right after loading a config, so a bad name fails before any data is read.

>>> from fedlora.config import RunConfig
>>> preflight(RunConfig())  # the defaults pass
"""

from __future__ import annotations

from fedlora.config import ConfigError, RobustConfig, RunConfig
from fedlora.fl.attacks import MALFORMED_KINDS, available_attacks
from fedlora.fl.combine import check_composition
from fedlora.fl.methods import build_method, method_options
from fedlora.fl.topology import check_topology
from fedlora.report.trackers import check_trackers
from fedlora.model.hub import check_model_name
from fedlora.model.load import resolve_device
from fedlora.model.precision import check_cuda_only, resolve_precision


def preflight(cfg: RunConfig, model: bool = True) -> None:
    """ConfigError when robust.attack is unknown, the topology cannot be built on the clients, or
    two features cannot be combined (fl/combine.check_composition; the engines check again with
    the client rule's side channels, which need the prepared data).

    With `model`, also ModelError when model.name cannot load here: a missing path, a typo of a
    built-in name, or a Hugging Face id neither cached nor reachable (model/hub.py; at most one
    1.5 s connect per process); or when the device lacks what model.precision, model.quantization
    or train.optimizer need (model/precision.py: k-bit loading and paged AdamW need CUDA). `fedlora config show` passes False: printing a config needs no model.
    """
    if model:
        check_model_name(cfg.model.name)
        device = resolve_device(cfg.model.device)
        resolve_precision(cfg.model.precision, device)  # bf16 on a GPU without it fails here
        check_cuda_only(cfg.model.quantization, cfg.train.optimizer, device)  # bitsandbytes on a CPU
    check_attack(cfg.robust)
    check_trackers(cfg.report.log_to)  # a tracker's missing package fails before any training
    check_topology(cfg.topology, cfg.partition.num_clients)  # a graph that cannot be built fails here
    check_composition(cfg, build_method(cfg.fl.method, method_options(cfg, cfg.fl.method)))


def check_attack(rb: RobustConfig) -> None:
    """robust.attack is 'none', 'malformed:<kind>' with a known kind, or a registered update attack."""
    if rb.attack == "none":
        return
    if rb.attack.startswith("malformed:"):
        kind = rb.attack.split(":", 1)[1]
        if kind not in MALFORMED_KINDS:
            raise ConfigError(f"robust.attack: unknown malformed kind {kind!r}; one of {', '.join(MALFORMED_KINDS)}")
    elif rb.attack not in available_attacks():
        raise ConfigError(f"robust.attack: {rb.attack!r} is not 'none', 'malformed:<kind>' or one of "
                          f"{', '.join(available_attacks())}")
