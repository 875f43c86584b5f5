"""Federated methods, one file each, registered by name on import."""

from fedlora.fl.methods import centralized, fedit, local  # noqa: F401  (registration)
from fedlora.fl.methods.base import ClientUpdate, Method, weighted_mean
from fedlora.fl.methods.registry import available_methods, build_method, method_class, register

__all__ = ["ClientUpdate", "Method", "available_methods", "build_method", "method_class", "register",
           "weighted_mean"]
