"""End to end: experiment.run / compare write a complete run directory on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import make_config
from fedlora import compare, load_config, prepare, run
from fedlora.experiment import new_run_dir, run_method
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import build_method
from fedlora.model import build_tiny_model
from fedlora.model.lora import load_adapter_state


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = make_config("run_name=e2e", output_dir=out)
    return run(cfg, quiet=True)


def test_run_dir_layout(run_dir):
    assert run_dir.name == "e2e" and run_dir.is_dir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapters" / "global" / "adapter_config.json").is_file()
    assert (run_dir / "adapters" / "global" / "adapter_model.safetensors").is_file()
    plots = list((run_dir / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_config_yaml_reloads_to_same_config(run_dir):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "tiny" and saved["fl"]["method"] == "fedit"
    reloaded = load_config(run_dir / "config.yaml")
    assert reloaded.to_dict() == saved


def test_metrics_jsonl_rows(run_dir):
    rows = _jsonl(run_dir / "metrics.jsonl")
    assert rows and all({"round", "client", "method"} <= set(r) for r in rows)
    assert {r["method"] for r in rows} == {"fedit"}
    assert {r["round"] for r in rows} == {1, 2}
    final = [r for r in rows if r["round"] == 2 and isinstance(r["client"], int)]
    assert sorted(r["client"] for r in final) == [0, 1, 2]
    assert all(0 <= r["accuracy"] <= 1 for r in final)
    assert sum(1 for r in rows if r["client"] == "server") == 2


def test_summary_matches_metrics(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _jsonl(run_dir / "metrics.jsonl")
    final = [r for r in rows if r["round"] == 2 and isinstance(r["client"], int)]
    assert summary["method"] == "fedit" and summary["rounds"] == 2
    assert summary["clients"]["accuracy"]["mean"] == pytest.approx(np.mean([r["accuracy"] for r in final]))
    assert summary["clients"]["accuracy"]["count"] == 3
    server = [r for r in rows if r["client"] == "server"]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in server) > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in server) > 0
    glob = next(r for r in rows if r["round"] == 2 and r["client"] == "global")
    assert summary["global"]["accuracy"] == pytest.approx(glob["accuracy"])


def test_exported_adapter_loads_in_peft_with_same_logits(fed, tmp_path):
    from peft import PeftModel

    result = run_method(fed, "fedit", tmp_path / "m", quiet=True)
    path = tmp_path / "m" / "adapters" / "global"
    server = result.state.server
    assert any(k.endswith("lora_B") and torch.count_nonzero(v) > 0 for k, v in server.items())
    load_adapter_state(fed.model, server)
    ids = torch.tensor([fed.clients[0].test.prompt_ids[0]])
    with torch.no_grad():
        expected = fed.model(input_ids=ids).logits
        base, _ = build_tiny_model(0)  # the seed load_model('tiny') uses
        plain = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(build_tiny_model(0)[0], str(path)).eval()
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-5)  # the adapter really changes the logits


def test_same_run_name_never_overwrites(tmp_path):
    cfg = make_config("run_name=same", "fl.rounds=1", "eval.global_test=false", output_dir=tmp_path)
    fed = prepare(cfg)
    first = run(cfg, quiet=True, fed=fed)
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    second = run(cfg, quiet=True, fed=fed)
    assert first != second and first.name == "same" and second.name == "same-1"
    assert (second / "metrics.jsonl").is_file()
    after = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after == before
    third = new_run_dir(cfg, "x")
    assert third.name == "same-2" and not any(third.iterdir())


def test_personalized_run_saves_client_adapters(fed, tmp_path):
    result = run_method(fed, "local", tmp_path / "local", quiet=True)
    folders = sorted(p.name for p in (tmp_path / "local" / "adapters").iterdir())
    assert folders == [f"client_{i}" for i in range(fed.num_clients)]
    assert result.personalized


def test_compare_writes_comparison(tmp_path):
    cfg = make_config("fl.rounds=1", output_dir=tmp_path)
    out = compare(cfg, ["fedit", "local"], quiet=True)
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "comparison.json").read_text())
    assert [row["method"] for row in table] == ["zero-shot", "baseline-logreg", "fedit", "local"]
    by = {row["method"]: row for row in table}
    assert by["local"]["global"] is None and by["fedit"]["global"] is not None
    assert by["local"]["megabytes"] == 0 and by["fedit"]["megabytes"] > 0
    assert all(0 <= row["clients"]["accuracy"]["mean"] <= 1 for row in table)
    md = (out / "comparison.md").read_text()
    assert all(m in md for m in ("zero-shot", "baseline-logreg", "fedit", "local"))
    assert (out / "fedit-seed0" / "metrics.jsonl").is_file() and (out / "local-seed0" / "summary.json").is_file()


def test_compare_rejects_unknown_method_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        compare(make_config(output_dir=tmp_path), ["fedit", "nope"], quiet=True)
    assert not any(tmp_path.iterdir())  # nothing was created


def test_zero_shot_is_base_model(fed):
    """Zero-shot rows score the untrained model: the same as a fresh run's initial adapter."""
    from fedlora.experiment import zero_shot
    from fedlora.train.evaluate import evaluate

    rows = zero_shot(fed)
    assert [r["client"] for r in rows] == [0, 1, 2, "global"]
    base, _ = build_tiny_model(0)
    ref = evaluate(base, fed.clients[1].test, fed.pad_id)
    assert rows[1]["accuracy"] == pytest.approx(ref["accuracy"])
    assert rows[1]["auroc"] == pytest.approx(ref["auroc"], nan_ok=True)
    assert all(r["round"] == 0 and r["method"] == "zero-shot" for r in rows)


def test_eval_every_skips_rounds(fed):
    import dataclasses

    cfg = dataclasses.replace(fed.cfg, fl=dataclasses.replace(fed.cfg.fl, rounds=3, eval_every=2))
    sim = Simulator(dataclasses.replace(fed, cfg=cfg), "fedit")
    rows = sim.run().rows
    evaluated = sorted({r["round"] for r in rows if "accuracy" in r})
    assert evaluated == [2, 3]  # every 2nd round, and always the last
    assert not math.isnan(sum(r["bytes_up"] for r in rows if r["client"] == "server"))


def test_no_global_test_set_runs_and_scores_clients_only():
    """data.global_test_fraction=0 (every row belongs to a client, as on a Flower node): the run
    scores each client's own test split and writes no global row."""
    cfg = make_config("data.global_test_fraction=0", "fl.rounds=1")
    fed = prepare(cfg)
    assert len(fed.global_test) == 0
    rows = Simulator(fed, build_method("fedit")).run().rows
    assert not [r for r in rows if r["client"] == "global"]
    assert len([r for r in rows if r.get("split") == "test"]) == cfg.partition.num_clients
