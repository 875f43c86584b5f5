"""Every JSON file a run writes parses with a strict parser: NaN is written as null, never bare."""

from __future__ import annotations

import json
import math

import numpy as np

from fedlora.cli import main
from fedlora.fl.checkpoint import read_checkpoint, round_dir, save_checkpoint
from fedlora.jsonio import dumps, loads_strict, read_jsonl, tag_nonfinite, untag_nonfinite

FAST = ["--set", "fl.rounds=2", "--set", "train.local_steps=1", "--set", "eval.max_examples=8",
        "--set", "partition.num_clients=4"]


def test_dumps_writes_null_and_loads_strict_refuses_bare_nan():
    text = dumps({"auroc": float("nan"), "eps": np.float64("inf"), "xs": np.array([1.0, np.nan]), "n": np.int64(3)})
    assert json.loads(text) == {"auroc": None, "eps": None, "xs": [1.0, None], "n": 3}
    for bare in ('{"a": NaN}', "[Infinity]", "[-Infinity]"):
        try:
            loads_strict(bare)
        except ValueError:
            continue
        raise AssertionError(f"{bare} parsed")


def test_tagged_nonfinite_round_trips_exactly():
    value = {"rows": [{"auroc": float("nan"), "x": 1.5}], "clip": float("inf"), "low": -math.inf, "t": (1, 2)}
    back = untag_nonfinite(loads_strict(json.dumps(tag_nonfinite(value), allow_nan=False)))
    assert math.isnan(back["rows"][0]["auroc"]) and back["rows"][0]["x"] == 1.5
    assert back["clip"] == math.inf and back["low"] == -math.inf and back["t"] == [1, 2]


def test_checkpoint_is_strict_json_and_restores_nan(tmp_path):
    rows = [{"client": 0, "round": 1, "auroc": float("nan"), "accuracy": 1.0}]
    save_checkpoint(tmp_path, 1, {"best": float("nan"), "clip": float("inf")}, rows, {"method": "fedit"})
    loads_strict((round_dir(tmp_path, 1) / "state.json").read_text())
    ckpt = read_checkpoint(round_dir(tmp_path, 1))
    assert math.isnan(ckpt.fields["best"]) and ckpt.fields["clip"] == math.inf
    assert math.isnan(ckpt.rows[0]["auroc"]) and ckpt.rows[0]["accuracy"] == 1.0


def test_every_json_file_of_a_compare_is_strict(tmp_path):
    assert main(["--quiet", "compare", "tiny", "--methods", "fedit,local", "--set", f"output_dir={tmp_path}",
                 *FAST]) == 0
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl"))
    names = {p.name for p in files}
    assert {"metrics.jsonl", "summary.json", "comparison.json", "rows.json", "partition.json",
            "state.json", "manifest.json"} <= names
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in lines:
            loads_strict(line)  # raises on a bare NaN / Infinity
    # The run had undefined scores (AUROC on a one-class client split): they are null, and read back as NaN.
    metrics = next(p for p in files if p.name == "metrics.jsonl" and p.parent.name == "local-seed0")
    assert '"auroc": null' in metrics.read_text()
    assert any(isinstance(r.get("auroc"), float) and math.isnan(r["auroc"]) for r in read_jsonl(metrics))
