"""fedlora: federated LoRA fine-tuning of LLMs across institutions that cannot share data."""

from fedlora.config import ConfigError, RunConfig, load_config, with_sources
from fedlora.data import DataError, load_table, make_partition
from fedlora.experiment import compare, resume, run
from fedlora.fl.engine import Simulator
from fedlora.fl.federation import Federation, prepare
from fedlora.fl.methods import Method, available_methods, build_method, register
from fedlora.fl.payload import PayloadError
from fedlora.model import ModelError, export_merged, load_model

from fedlora.version import __version__  # noqa: E402,F401  (one place: report.html reads it too)

__all__ = [
    "ConfigError", "DataError", "Federation", "Method", "ModelError", "PayloadError", "RunConfig",
    "Simulator", "available_methods", "build_method", "compare", "export_merged", "load_config", "load_model",
    "load_table", "make_partition", "prepare", "register", "resume", "run", "with_sources",
]
