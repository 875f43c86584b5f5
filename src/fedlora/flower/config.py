"""The run config Flower carries, and how a SuperNode's node config selects its data.

Every fedlora hyperparameter is one key of Flower's run config, named as `fedlora run --set`
names it (`fl.rounds = 4`, `train.lr = 0.003`, `lora.target_modules = "[q_proj, v_proj]"`), so
the app folder's `[tool.flwr.app.config]` lists them one per line and `flwr run APP
--run-config 'fl.rounds=6 fl.method="fedsa"'` overrides any of them. The ServerApp and every
ClientApp rebuild the very same `RunConfig` the simulator would from those keys. Flower's values
are TOML scalars, so a list, a mapping or None travels as a string the reader parses as YAML
(None as ""); a string field keeps its text verbatim. The launcher's own keys have hyphens
(output-dir, round-timeout, min-nodes, resume). An app written by an earlier fedlora (the whole
YAML in one `fedlora-config` string) is still read.

Node config (`flower-supernode --node-config "..."`), one of:
  partition-id=i num-partitions=N   client i of the config's own partition (built-in data; demos,
                                    and the equality test against the simulator)
  partition-id=i data-path="x.csv"  this site's own table; it is all of this client's data
                                    (split into train/val/test by the config's fractions; the
                                    data.global_test_fraction share is held out and unused, since
                                    prepare() cannot yet encode an empty global test set). With
                                    data.clients, the file is read as client i's entry says (its
                                    target, columns, task)
With data.clients (several sources), client ids run over the entries (config/sources.py) and
N is the sum of the entries' clients.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

import yaml

from fedlora.config import ConfigError, RunConfig, apply_overrides, from_dict, validate
from fedlora.config.sources import federation_size, is_multi_source, own_source_config
from fedlora.config.typed import is_frame

CONFIG_KEY = "fedlora-config"
OUTPUT_KEY = "output-dir"
TIMEOUT_KEY = "round-timeout"
MIN_NODES_KEY = "min-nodes"
RESUME_KEY = "resume"
"""true: continue the run in output-dir from its newest good checkpoint (flower/rundir.py)."""


def config_to_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_text(text: str, overrides: list[str] | None = None) -> RunConfig:
    cfg = from_dict(RunConfig, apply_overrides(yaml.safe_load(text) or {}, overrides or []))
    validate(cfg)
    return cfg


LAUNCHER_KEYS = (OUTPUT_KEY, TIMEOUT_KEY, MIN_NODES_KEY, RESUME_KEY)


def _leaf_hints(cls: type = RunConfig, prefix: str = "") -> dict[str, object]:
    """'fl.rounds' -> its type hint, for every field below the config's sections."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _leaf_hints(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = hints[f.name]
    return out


_HINTS = _leaf_hints()
_TEXT = (str, str | None, typing.Optional[str])  # noqa: UP045 (both spellings occur in hints)


def run_config_values(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """One Flower run-config value per hyperparameter of `cfg` (a TOML scalar each)."""
    framed = [i for i, e in enumerate(cfg.data.clients or []) if isinstance(e, dict) and is_frame(e.get("source"))]
    if framed:
        raise ConfigError(f"data.clients[{framed[0]}] is a DataFrame given in Python; Flower nodes read files: "
                          "write it to one (df.to_parquet('site.parquet')) and give that path, or the node's own "
                          "data-path")
    flat = {}
    for key in _HINTS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node is None:
            flat[key] = ""
        elif isinstance(node, (bool, int, float, str)):
            flat[key] = node
        else:  # lists and mappings: YAML in a string
            flat[key] = yaml.safe_dump(node, default_flow_style=True, sort_keys=False).strip()
    return flat


def config_from_values(values: Mapping[str, object]) -> RunConfig:
    """The RunConfig from per-hyperparameter run-config values (others' defaults where absent)."""
    nested: dict = {}
    for key, value in values.items():
        if key in LAUNCHER_KEYS:
            continue
        hint = _HINTS.get(key)
        if hint is None:
            raise ConfigError(f"run config key {key!r} is not a fedlora hyperparameter; keys look like "
                              "fl.rounds or train.lr (the app folder's pyproject.toml lists them all)")
        if isinstance(value, str) and hint not in _TEXT:
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"run config {key}={value!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
        elif value == "" and hint is not str:
            value = None
        node = nested
        *sections, name = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[name] = value
    cfg = from_dict(RunConfig, nested)
    validate(cfg)
    return cfg


def run_config_of(run_config: Mapping[str, object]) -> RunConfig:
    text = run_config.get(CONFIG_KEY)
    if text is not None:  # an app folder written by fedlora before one key per hyperparameter
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the Flower run config's {CONFIG_KEY!r} is empty")
        return config_from_text(text)
    if not any(key in _HINTS for key in run_config):
        raise ValueError("the Flower run config has no fedlora hyperparameters (fl.method, fl.rounds, ...): "
                         "build the app with `fedlora flower app CONFIG --out DIR`")
    return config_from_values(run_config)


def node_selection(node_config: Mapping[str, object], cfg: RunConfig) -> tuple[int, RunConfig]:
    """(client id, the config this node prepares its data with) from its node config."""
    if "partition-id" not in node_config:
        raise ValueError('node config needs partition-id, e.g. --node-config "partition-id=0 num-partitions=3"')
    cid = int(node_config["partition-id"])
    n = federation_size(cfg)
    size = "the clients of data.clients add up to " if is_multi_source(cfg) else "the run config has partition.num_clients="
    if not 0 <= cid < n:
        raise ValueError(f"partition-id={cid} but {size}{n}")
    path = node_config.get("data-path")
    if path:  # this site's own table (with data.clients, read as its entry says): all of it one client
        own = own_source_config(cfg, cid, str(path))
        validate(own)
        return cid, own
    given = node_config.get("num-partitions")
    if given is not None and int(given) != n:
        raise ValueError(f"num-partitions={given} but {size}{n}")
    return cid, cfg
