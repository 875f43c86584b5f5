"""--log-to tensorboard,mlflow: what the trackers hold, read back with each tool's own reader, is
what metrics.jsonl holds; unknown names and missing packages fail before any run directory."""

from __future__ import annotations

import math
import sys

import pytest

from fedlora.cli import main
from fedlora.config import ConfigError
from fedlora.jsonio import read_jsonl
from fedlora.report.trackers import check_trackers, round_scalars

FAST = ["--set", "fl.rounds=2", "--set", "train.local_steps=1", "--set", "eval.max_examples=8",
        "--set", "partition.num_clients=3", "--set", "fl.checkpoint=false"]


def _expected(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{tag: {round: value}} of metrics.jsonl, computed here independently of round_scalars."""
    out: dict[str, dict[int, float]] = {}
    by_round: dict[int, list[dict]] = {}
    for row in rows:
        by_round.setdefault(row["round"], []).append(row)
    for rnd, group in by_round.items():
        for row in group:
            who = f"client_{row['client']}" if isinstance(row["client"], int) else row["client"]
            for key, value in row.items():
                if key not in ("round", "client") and type(value) in (int, float) and math.isfinite(value):
                    out.setdefault(f"{who}/{key}", {})[rnd] = float(value)
        acc = [r["accuracy"] for r in group if isinstance(r["client"], int)]
        out.setdefault("client_mean/accuracy", {})[rnd] = sum(acc) / len(acc)
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, monkeypatch_module):
    pytest.importorskip("tensorboard")  # the trackers extra (in dev, so CI has both)
    pytest.importorskip("mlflow")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("tracked")
    code = main(["--quiet", "compare", "tiny", "--methods", "fedit", "--log-to", "tensorboard,mlflow",
                 "--set", f"output_dir={root}", *FAST])
    assert code == 0
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir, read_jsonl(run_dir / "fedit-seed0" / "metrics.jsonl")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = tracked_run
    acc = EventAccumulator(str(run_dir / "fedit-seed0" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    expected = _expected(rows)
    assert set(expected) <= set(logged)
    for tag, by_round in expected.items():
        assert set(logged[tag]) == set(by_round) == {1, 2}, tag
        for rnd, value in by_round.items():
            assert logged[tag][rnd] == pytest.approx(value, rel=1e-6), (tag, rnd)  # TensorBoard keeps float32
    nan_auroc = [(r["round"], r["client"]) for r in rows if isinstance(r["client"], int) and math.isnan(r["auroc"])]
    for rnd, cid in nan_auroc:  # NaN is not logged as a point
        assert rnd not in logged.get(f"client_{cid}/auroc", {})


def test_mlflow_run_equals_metrics_jsonl(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, rows = tracked_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(run_dir.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "fedit-seed0" and run.info.status == "FINISHED"
    assert run.data.params["fl.rounds"] == "2" and run.data.params["report.log_to"] == "['tensorboard', 'mlflow']"
    for tag, by_round in _expected(rows).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert history == pytest.approx(by_round, rel=1e-12), tag


def test_round_scalars_skip_nan_and_flags():
    rows = [{"client": 0, "round": 1, "accuracy": 0.5, "auroc": float("nan"), "skipped": False},
            {"client": 1, "round": 1, "accuracy": 1.0, "auroc": None},
            {"client": "server", "round": 1, "bytes_up": 10, "sampled": [0, 1]}]
    assert round_scalars(rows) == {"client_0/accuracy": 0.5, "client_1/accuracy": 1.0, "server/bytes_up": 10.0,
                                   "client_mean/accuracy": 0.75}


def test_unknown_tracker_name_suggests_a_close_one(tmp_path, capsys):
    code = main(["--quiet", "run", "tiny", "--log-to", "tensorbord", "--set", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'tensorbord'" in err and "did you mean tensorboard" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("name,package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_package_names_the_extra_before_training(tmp_path, capsys, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # find_spec and import both see it as absent
    with pytest.raises(ConfigError, match=r'pip install "fedlora\[trackers\]"'):
        check_trackers([name])
    code = main(["--quiet", "run", "tiny", "--log-to", name, "--set", f"output_dir={tmp_path}"])
    assert code == 2
    assert 'pip install "fedlora[trackers]"' in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run directory: nothing trained


def test_round_scalars_average_calibrated_columns_over_clients():
    rows = [{"client": 0, "round": 2, "accuracy": 0.5, "accuracy_cal": 0.75, "ece_cal": 0.1},
            {"client": 1, "round": 2, "accuracy": 1.0, "accuracy_cal": 0.25, "ece_cal": 0.3}]
    out = round_scalars(rows)
    assert out["client_mean/accuracy_cal"] == pytest.approx(0.5)
    assert out["client_mean/ece_cal"] == pytest.approx(0.2)
    assert out["client_1/accuracy_cal"] == 0.25
