"""User files end to end: a JSONL text task and a user CSV go through the same simulator path."""

import json

import numpy as np
import pandas as pd

from conftest import make_config
from fedlora import run
from fedlora.data import load_table


def _write_jsonl(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    good = ["great service and kind staff", "fast refund, very happy", "excellent support team"]
    bad = ["rude staff and long wait", "refund never arrived", "terrible support, very slow"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            label = "positive" if i % 2 else "negative"
            text = rng.choice(good if label == "positive" else bad)
            fh.write(json.dumps({"text": f"{text} #{i}", "label": label}) + "\n")


def test_jsonl_text_task_runs_and_scores(tmp_path):
    data = tmp_path / "reviews.jsonl"
    _write_jsonl(data)
    cfg = make_config(f"data.source={data}", "data.columns=null", "data.max_rows=null",
                      "partition.num_clients=2", "partition.scheme=iid", output_dir=tmp_path / "runs")
    out = run(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if isinstance(r["client"], int) and "accuracy" in r]
    assert {r["client"] for r in scored} == {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedit"
    # The text itself is the prompt's body (no "column is value" serialization).
    table = load_table(cfg.data)
    assert table.kind == "text" and table.classes == ["negative", "positive"]


def test_user_csv_with_named_target_runs(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "age": rng.integers(20, 80, 90),
        "region": rng.choice(["north", "south", "east"], 90),
        "smoker": rng.choice(["yes", "no"], 90),
    })
    frame["outcome"] = np.where(frame["age"] > 50, "sick", "well")
    path = tmp_path / "patients.csv"
    frame.to_csv(path, index=False)
    cfg = make_config(f"data.source={path}", "data.target=outcome", "data.columns=null",
                      "data.max_rows=null", "partition.scheme=column", "partition.column=region",
                      output_dir=tmp_path / "runs")
    out = run(cfg, quiet=True)
    partition = json.loads((out / "partition.json").read_text())
    assert len(partition) == 3  # one client per region value
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in comparison] == ["zero-shot", "baseline-logreg", "fedit"]
