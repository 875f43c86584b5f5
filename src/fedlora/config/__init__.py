"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides.

A config is a tree of dataclasses. Unknown keys and wrong types fail early with a message that
names the key and lists the valid ones, so a typo in a YAML file never silently falls back to a
default.

- `sections`: the dataclasses, one per YAML section, and `RunConfig` holding them;
- `loading`: `load_config`, `from_dict`, `apply_overrides` (YAML and `a.b=value` strings);
- `validate`: value and cross-field checks on a built config;
- `errors`: `ConfigError`.

This package imports nothing else from fedlora. Checks that need other modules (the topology
graph, attack names) run in `fedlora.fl.preflight.preflight(cfg)`, called by every entry point
before expensive work.

>>> cfg = load_config(None, ["fl.rounds=3", "partition.num_clients=2"])
>>> cfg.fl.rounds, cfg.partition.num_clients
(3, 2)
"""

from fedlora.config.errors import ConfigError
from fedlora.config.loading import (  # noqa: F401  (the underscored helpers stay importable from here)
    _CHOICES,
    _FLOAT,
    _MAX_DEPTH,
    _MAX_VALUES,
    _check_extent,
    _coerce,
    apply_overrides,
    from_dict,
    load_config,
    with_sources,
)
from fedlora.config.sections import (
    ConcordiaConfig,
    DataConfig,
    DPConfig,
    EvalConfig,
    FLConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    ReportConfig,
    RobustConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
)
from fedlora.config.validate import _validate_dp, _validate_faults, _validate_robust, validate  # noqa: F401

__all__ = [
    "ConcordiaConfig", "ConfigError", "DPConfig", "DataConfig", "EvalConfig", "FLConfig", "LoraConfig",
    "ModelConfig", "PartitionConfig", "ReportConfig", "RobustConfig", "RunConfig", "TopologyConfig", "TrainConfig",
    "apply_overrides", "from_dict", "load_config", "validate", "with_sources",
]
