"""Experiment trackers fed by the per-round hook: TensorBoard and MLflow (`report.log_to`).

metrics.jsonl stays the record of a run; a tracker gets the same numbers as they are written, so a
dashboard can follow a run live and put runs side by side. Each round, every metric row's finite
numbers go out as `<who>/<key>` at step = round, with who = client_<i>, global, server, ...
(accuracy, auroc, train_loss, bytes_up, time_train, ...), plus `client_mean/<metric>`: the mean
over the round's client rows, as plots/accuracy.png draws it. A NaN or null (AUROC on a one-class
split) is not logged: a tracker would draw it as a point that no score has. Zero-shot and baseline
rows (round 0, not part of metrics.jsonl) are not logged either.

- tensorboard: `torch.utils.tensorboard.SummaryWriter` writing `RUN_DIR/tensorboard/` (one folder per
  method and seed under a compare directory, so `tensorboard --logdir COMPARE_DIR` shows them all),
  and the resolved config as text.
- mlflow: one MLflow run per method and seed, in the experiment named after the top run directory,
  with the config as dotted params. The store is MLFLOW_TRACKING_URI when set (a server, a
  database), else a file store in `TOP_RUN_DIR/mlruns` (`mlflow ui --backend-store-uri
  file:TOP_RUN_DIR/mlruns`). MLflow 3 keeps the file store in maintenance mode behind
  MLFLOW_ALLOW_FILE_STORE; fedlora sets that variable for its own default store (unless the user
  set it), since a folder beside the run needs no database and travels with the run.

Both come with `pip install "fedlora[trackers]"`; a missing package is a ConfigError at preflight,
before any model is loaded. A resumed run logs the rounds it runs again (a new event file, a new
MLflow run).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from fedlora.config import ConfigError
from fedlora.config.validate import TRACKERS

INSTALL = 'pip install "fedlora[trackers]"'
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
MEAN_METRICS = ("accuracy", "macro_f1", "auroc", "train_loss", "ece", "accuracy_cal", "macro_f1_cal", "ece_cal")
"""Averaged over the round's client rows as client_mean/<metric> (the calibrated ones when present)."""
_SKIP = {"round", "client"}


def check_trackers(names: list[str]) -> None:
    """ConfigError naming the install command when a tracker's package is missing."""
    for name in names:
        if name not in TRACKERS:  # validate() refuses these first; a direct caller gets the same answer
            raise ConfigError(f"report.log_to: unknown tracker {name!r}; one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise ConfigError(f"report.log_to: {name} needs the {_PACKAGE[name]!r} package, which is not "
                              f"installed; run: {INSTALL}")


def round_scalars(rows: list[dict]) -> dict[str, float]:
    """{tag: value} of one round's rows: each finite number as '<who>/<key>', and the client means."""
    out: dict[str, float] = {}
    clients: dict[str, list[float]] = {}
    for row in rows:
        who = f"client_{row['client']}" if isinstance(row.get("client"), int) else str(row.get("client"))
        for key, value in row.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out[f"{who}/{key}"] = float(value)
                if isinstance(row.get("client"), int) and key in MEAN_METRICS:
                    clients.setdefault(key, []).append(float(value))
    out.update({f"client_mean/{k}": sum(v) / len(v) for k, v in clients.items()})
    return out


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        import yaml

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a running `tensorboard` sees each round as it ends

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, run_name: str, config: dict, top_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (top_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(top_dir.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(top_dir.name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"fedlora.run_dir": str(run_dir)}).info.run_id
        params = [Param(k, v) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class Trackers:
    """The trackers of one run (one method and seed): `log_round` from the per-round hook, then
    `close` ('FINISHED', or 'FAILED' when the run raised)."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict, top_dir: Path | None = None):
        check_trackers(names)
        top = Path(top_dir or run_dir)
        self.open = [_TensorBoard(run_dir, run_name, config) if name == "tensorboard"
                     else _MLflow(run_dir, run_name, config, top) for name in dict.fromkeys(names)]

    def log_round(self, round_index: int, rows: list[dict]) -> None:
        scalars = round_scalars(rows)
        for tracker in self.open:
            tracker.log(round_index, scalars)

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.open:
            tracker.close(status)
        self.open = []


def open_trackers(cfg, run_dir: Path, run_name: str, top_dir: Path | None = None) -> Trackers | None:
    """The trackers `cfg.report.log_to` names for one run, or None when it names none."""
    if not cfg.report.log_to:
        return None
    return Trackers(cfg.report.log_to, run_dir, run_name, cfg.to_dict(), top_dir)
