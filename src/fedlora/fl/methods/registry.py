"""Methods by name. Each method file ends with `@register`; `build_method` validates names."""

from __future__ import annotations

from typing import Any

from fedlora.fl.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    return method_class(name)(**(options or {}))


def method_options(cfg, name: str) -> dict[str, Any]:
    """The options for method `name` from `cfg.fl.method_args`.

    Two forms: flat options for `fl.method` ({tau: 0.2}), or options keyed by method name for
    comparisons ({fedtree: {tau: 0.2}, fedprox: {mu: 0.1}}). Flat options never leak into the
    other methods of a comparison.
    """
    args = dict(cfg.fl.method_args or {})
    if args and all(key in _METHODS for key in args):
        chosen = args.get(name) or {}
        if not isinstance(chosen, dict):
            raise ValueError(f"fl.method_args.{name} must be a mapping of options")
        return dict(chosen)
    return args if name == cfg.fl.method else {}
