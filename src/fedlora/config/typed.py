"""Typed construction of config dataclasses from mappings: every key and type checked.

`from_dict` builds a dataclass tree, refusing unknown keys (with close matches) and values of the
wrong type, naming the dotted key. Shared by `config/loading.py` (the whole RunConfig) and
`config/sources.py` (each entry of data.clients).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

from fedlora.config.errors import ConfigError

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


_CHOICES = {
    "data.number_format": {"digits", "quantile"},
    "data.prompt_style": {"auto", "chat", "plain"},
    "partition.scheme": {"iid", "dirichlet", "quantity", "column"},
    "train.optimizer_state": {"reset", "keep"},
    "fl.straggler_policy": {"drop", "stale"},
    "fl.sampling": {"auto", "fixed", "poisson"},
    "eval.baseline": {"logreg", "gboost", "none"},
    "dp.accountant": {"rdp", "prv"},
    "topology.graph": {"ring", "torus", "complete", "kregular", "erdos_renyi", "pairwise", "edges"},
    "topology.weights": {"metropolis", "uniform"},
    "concordia.variant": {"concordia", "static", "decoupled", "uniform", "local"},
}


MEMORY_PREFIX = "memory:"
"""How a config file shows a source given in Python as a DataFrame or a Hugging Face Dataset."""


def is_frame(value: Any) -> bool:
    """A pandas DataFrame or a `datasets.Dataset` (anything with `to_pandas`), not a path or name."""
    return not isinstance(value, (str, bytes)) and (hasattr(value, "to_pandas") or
                                                     type(value).__name__ == "DataFrame")


def as_frame(value: Any):
    """The pandas DataFrame of an in-memory source."""
    return value if type(value).__name__ == "DataFrame" else value.to_pandas()


def frame_label(value: Any) -> str:
    """'memory:DataFrame 120x6 sha256:<12 hex>': what config.yaml says of an in-memory source (its
    rows never go there), with a digest of its rows so a resumed run can tell the same data."""
    import hashlib

    kept = _LABELS.get(id(value))
    if kept is not None and kept[0] is value:  # specs are read often; digest each frame once
        return kept[1]
    frame = as_frame(value)
    digest = hashlib.sha256(frame.to_csv(index=False).encode("utf-8")).hexdigest()[:12]
    label = f"{MEMORY_PREFIX}{type(value).__name__} {frame.shape[0]}x{frame.shape[1]} sha256:{digest}"
    if len(_LABELS) >= 16:
        _LABELS.clear()
    _LABELS[id(value)] = (value, label)
    return label


_LABELS: dict[int, tuple[Any, str]] = {}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint of `key`; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):  # NaN passes no range check, so it would slip through validate()
            raise ConfigError(f"{key}: expected a number, got NaN")
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, bool, str) and type(value) is hint:
        return value
    if hint is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        # YAML 1.1 reads 5e-4 (no decimal point) as a string; accept it as the number it is.
        return float(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be ints, None, ...
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(names), n=3)
        hint = f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}{hint}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
            if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {sorted(_CHOICES[key])}")
    return cls(**kwargs)
