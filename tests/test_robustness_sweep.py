"""`fedlora robustness`: the sweep's files, cell count, n/a cells and a robust-vs-mean sanity check."""

from __future__ import annotations

import json

import pytest

from conftest import make_config
from fedlora.cli import main
from fedlora.robustness import chain_label, parse_chain, robustness_sweep


def test_parse_chain():
    assert parse_chain("nnm+trimmed_mean") == ["nnm", "trimmed_mean"]
    assert parse_chain(["median"]) == ["median"]
    assert chain_label([{"nnm": {}}, "krum"]) == "nnm+krum"


def test_sweep_writes_files_cells_and_na(tmp_path):
    cfg = make_config(output_dir=tmp_path)  # 3 clients, all sampled
    out = robustness_sweep(cfg, ["sign_flip", "gaussian"], ["mean", "median", "krum"], [0, 1], [None], [0],
                           quiet=True, attack_args={"sign_flip": {"scale": 100}})
    for name in ("sweep.jsonl", "sweep.md", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    # per aggregator: f=0 once (attack 'none') + f=1 under each of the 2 attacks
    assert len(rows) == 3 * (1 + 2)
    assert {(r["f"], r["attack"]) for r in rows} == {(0, "none"), (1, "sign_flip"), (1, "gaussian")}
    # krum needs n > 2f + 2: valid for f=0, n/a for f=1 with 3 clients
    krum = {(r["f"], r["attack"]): r for r in rows if r["aggregator"] == "krum"}
    assert krum[(0, "none")]["valid"]
    assert not krum[(1, "sign_flip")]["valid"] and "krum" in krum[(1, "sign_flip")]["reason"]
    assert all(r["valid"] for r in rows if r["aggregator"] != "krum")
    assert all(0 <= r["accuracy"] <= 1 for r in rows if r["valid"])
    assert all(len(r["byzantine"]) == r["f"] for r in rows if r["valid"])
    md = (out / "sweep.md").read_text()
    assert "n/a" in md and "worst f=1" in md and "sign_flip f=1" in md
    # Under sign_flip x100 the mean is dragged ~30x the honest update away; the median is not.
    dev = {r["aggregator"]: r["deviation"] for r in rows if r["attack"] == "sign_flip" and r["valid"]}
    assert dev["mean"] > 5
    assert dev["median"] < dev["mean"] / 5
    acc = {r["aggregator"]: r["accuracy"] for r in rows if r["attack"] == "sign_flip" and r["valid"]}
    assert acc["median"] >= acc["mean"] - 0.5  # sanity only: accuracy of the random tiny model is noisy


def test_cli_robustness(tmp_path, capsys):
    args = ["--quiet", "robustness", "tiny", "--attacks", "ipm", "--aggregators", "mean;nnm+trimmed_mean",
            "--f", "1", "--momentum", "0.9", "--seeds", "1", "--attack-args", "ipm.tau=2.0",
            *[x for o in ("partition.num_clients=3", "partition.min_rows=5", "data.max_rows=120",
                          "fl.rounds=1", "train.local_steps=1", "eval.max_examples=8", "eval.zero_shot=false",
                          "eval.baseline=none", f"output_dir={tmp_path}") for x in ("--set", o)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = next(tmp_path.glob("robustness-*"))
    assert str(run_dir) in out
    rows = [json.loads(line) for line in (run_dir / "sweep.jsonl").read_text().splitlines()]
    assert [(r["aggregator"], r["attack"], r["momentum"]) for r in rows] == [
        ("mean", "ipm", 0.9), ("nnm+trimmed_mean", "ipm", 0.9)]
    assert rows[0]["attack_args"] == {"tau": 2.0}


@pytest.mark.parametrize("bad", [["--f", "5"], ["--attack-args", "scale=100"], ["--momentum", "x"]])
def test_cli_robustness_errors(tmp_path, bad):
    assert main(["--quiet", "robustness", "tiny", "--seeds", "1", "--set", f"output_dir={tmp_path}", *bad]) == 2
