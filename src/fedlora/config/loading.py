"""Build a `RunConfig` from YAML and dotted command-line overrides, checking every key and type.

`load_config` reads a file (or starts from the defaults), applies `a.b=value` overrides, refuses
documents too large or deep to be a config, builds the dataclass tree with `from_dict` (unknown
keys and wrong types fail with a message naming the key and the valid ones) and runs
`fedlora.config.validate.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fedlora.config.errors import ConfigError
from fedlora.config.sections import RunConfig
from fedlora.config.typed import _CHOICES, _FLOAT, _coerce, from_dict  # noqa: F401  (re-exported)
from fedlora.config.validate import validate


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. fl.rounds=3)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty `section:` line in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0][:120]}); "
                              "quote it, e.g. key='[a'") from None
    return data


_MAX_VALUES, _MAX_DEPTH = 100_000, 32


def _check_extent(data: Any) -> None:
    """Refuse documents too large or too deep to be a config: YAML aliases (&a, *a) may expand
    exponentially or refer to themselves, and to_dict()/safe_dump would then never finish."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES or depth > _MAX_DEPTH:
            raise ConfigError(f"config is too large or nested too deeply (over {_MAX_VALUES} values or "
                              f"{_MAX_DEPTH} levels, YAML aliases counted as copies); check for an alias "
                              "that refers to itself (&a [*a])")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def shipped_configs() -> dict[str, Path]:
    """Configs shipped inside the package (`fedlora/configs/*.yaml`), by name (e.g. 'demo')."""
    folder = resources.files("fedlora") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def config_path(name: str | Path) -> Path:
    """An existing file, or a YAML path as given, or the shipped config called `name` (e.g. 'tiny')."""
    path = Path(name)
    if path.exists() or str(name).endswith((".yaml", ".yml")) or len(path.parts) > 1:
        return path
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    close = difflib.get_close_matches(str(name), sorted(shipped), n=3)
    raise ConfigError(f"no config file {str(name)!r} and no shipped config of that name"
                      + (f"; did you mean {' or '.join(close)}?" if close else "")
                      + f" (shipped: {', '.join(sorted(shipped))})")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    `path` may also be the name of a shipped config (`load_config("tiny")`), as on the command line.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              f"(e.g. 'fl: {{rounds: 3}}'), got a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    _check_extent(data)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def with_sources(cfg: RunConfig, entries: list[dict]) -> RunConfig:
    """`cfg` with data.clients set to `entries`, checked; the Python way to give a source as a
    pandas DataFrame or a `datasets.Dataset`, which no YAML file can hold:

        cfg = with_sources(load_config("tiny"), [{"source": df_bank_a, "target": "default"},
                                                 {"source": "german-credit", "clients": 2}])
    """
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, clients=[dict(e) for e in entries]))
    validate(out)
    return out
