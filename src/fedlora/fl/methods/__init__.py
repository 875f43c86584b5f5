"""Federated methods, one file each, registered by name when this package is imported.

Every module in this folder is imported here, so a new method file registers itself with
`@register` and needs no other edit.
"""

import importlib
import pkgutil

from fedlora.fl.methods.base import ClientUpdate, Method, weighted_mean
from fedlora.fl.methods.registry import (available_methods, build_method, method_class, method_options,
                                         register)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ClientUpdate", "Method", "available_methods", "build_method", "method_class", "method_options",
           "register", "weighted_mean"]
