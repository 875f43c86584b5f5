"""A Flower run's outputs and restart: the simulator's run directory, checkpoints, resume, DP's target.

Layers:
- in process: the ServerApp's own loop (`apps.run`) over the fake Grid of test_flower_hostile.py
  (real `Node`s answering at once): the run directory's files, a run stopped after round 1's
  checkpoint and resumed (fresh nodes, as a new Flower run has) equal to the uninterrupted run,
  the refusals, dp.target_epsilon, the per-round progress line;
- end to end: real SuperLink and SuperNodes (`LocalDeployment`); the ServerApp process is SIGKILLed
  after round 1's checkpoint, a new `flwr run` with resume=true continues on the same deployment,
  and the final global adapter is bitwise the uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from conftest import make_config, strip_times  # noqa: E402
from flwr.app import MessageType  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_flower_hostile import FakeGrid, honest, task_identity  # noqa: E402,F401 (the fixture is autouse)

from fedlora import prepare  # noqa: E402
from fedlora.fl.checkpoint import CheckpointError, checkpoint_rounds  # noqa: E402
from fedlora.fl.engine import Simulator  # noqa: E402
from fedlora.flower import apps  # noqa: E402
from fedlora.flower.config import (MIN_NODES_KEY, OUTPUT_KEY, RESUME_KEY, TIMEOUT_KEY,  # noqa: E402
                                   run_config_values)
from fedlora.flower.deploy import LocalDeployment  # noqa: E402
from fedlora.jsonio import jsonable, read_jsonl  # noqa: E402
from fedlora.model.lora import _PREFIX  # noqa: E402
from fedlora.report.summary import summarize  # noqa: E402

OVERRIDES = ("fl.eval_every=0", "eval.global_test=false", "partition.num_clients=2")


class Killed(Exception):
    """Stands for the ServerApp process dying (in process: raised by a node's handler)."""


def grid_of(cfg, die_at_round: int | None = None) -> FakeGrid:
    """Fresh honest nodes (empty context.state, as a new Flower run gives them); with `die_at_round`,
    the run dies when that round's first train message is sent."""
    handlers = {10 + cid: honest(cfg, cid) for cid in range(cfg.partition.num_clients)}
    if die_at_round is not None:
        def dying(handler):
            def handle(msg):
                if msg.metadata.message_type == MessageType.TRAIN and int(msg.metadata.group_id) >= die_at_round:
                    raise Killed
                return handler(msg)
            return handle
        handlers = {node: dying(h) for node, h in handlers.items()}
    return FakeGrid(handlers)


def run_in(folder: Path, cfg, resume: bool = False, die_at_round: int | None = None):
    grid = grid_of(cfg, die_at_round)
    return apps.run(grid, {**run_config_values(cfg), TIMEOUT_KEY: 5.0, MIN_NODES_KEY: len(grid.handlers),
                           OUTPUT_KEY: str(folder), RESUME_KEY: resume})


def peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """adapters/global's tensors under fedlora's short names (PEFT's are prefixed, '.weight' last)."""
    raw = load_file(str(folder / "adapters" / "global" / "adapter_model.safetensors"))
    return {k[len(_PREFIX):-len(".weight")]: v for k, v in raw.items()}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "adapters differ"


# --- the run directory ---------------------------------------------------------------------------
def test_run_directory_is_the_simulators(tmp_path):
    """config.yaml, metrics.jsonl, summary.json, plots, checkpoints and a PEFT global adapter with
    fedlora.json and a card whose data section holds only what the server knows."""
    cfg = make_config(*OVERRIDES, "fl.rounds=2")
    run_in(tmp_path, cfg)
    ref = Simulator(prepare(cfg), "fedit").run()

    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "global_adapter.safetensors").exists()
    assert checkpoint_rounds(tmp_path / "checkpoints") == [1, 2]
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    folder = tmp_path / "adapters" / "global"
    assert {"adapter_config.json", "adapter_model.safetensors", "fedlora.json", "README.md"} <= {
        p.name for p in folder.iterdir()}
    assert_same(peft_tensors(tmp_path), ref.state.server)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == cfg.lora.r and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = summarize(ref.rows, "fedit", False)
    assert {k: summary[k] for k in expected} == jsonable(expected)  # NaN is null on disk
    info = json.loads((folder / "fedlora.json").read_text())
    assert info["data"] == {"source": cfg.data.source, "target": cfg.data.target, "columns": list(cfg.data.columns),
                            "number_format": cfg.data.number_format, "held_by": "2 nodes (the server saw no rows)"}
    card = (folder / "README.md").read_text()
    assert "held by 2 nodes" in card and "| client | train |" not in card  # no invented row counts


def test_generation_task_on_flower_equals_the_simulator(tmp_path):
    """data.task=generation through the real ServerApp loop: nodes train on response tokens and
    score their own test prompts by greedy generation (ROUGE, exact match, perplexity), and the
    server's run directory carries them, all equal to the simulator's. Generated text stays on
    the nodes: no samples.jsonl on the server's side."""
    from fedlora.config import load_config

    cfg = load_config("generation_tiny", [*OVERRIDES, "fl.rounds=2", "fl.eval_every=1", f"output_dir={tmp_path}"])
    run_in(tmp_path / "flower", cfg)
    ref = Simulator(prepare(cfg), "fedit").run()
    assert_same(peft_tensors(tmp_path / "flower"), ref.state.server)
    rows = read_jsonl(tmp_path / "flower" / "metrics.jsonl")
    tests = [r for r in strip_times(rows) if r.get("split") == "test"]
    assert tests == [r for r in strip_times(ref.rows) if r.get("split") == "test"] and len(tests) == 4
    assert {"rouge1", "rougeL", "exact_match", "perplexity"} <= set(tests[0])
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    expected = summarize(ref.rows, "fedit", False)
    assert {k: summary[k] for k in expected} == jsonable(expected)
    assert not (tmp_path / "flower" / "samples.jsonl").exists()


def test_loads_with_peft(tmp_path):
    from peft import PeftModel

    from fedlora.model import build_tiny_model
    from fedlora.model.lora import adapter_state

    run_in(tmp_path, make_config(*OVERRIDES, "fl.rounds=1"))
    base, _ = build_tiny_model(0)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "global"))
    assert_same(adapter_state(model), peft_tensors(tmp_path))


# --- resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("fl.method=flora",), ("dp.enabled=true", "dp.noise_multiplier=0.5")],
                         ids=["fedit", "flora", "dp"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, extra):
    """Stopped after round 1's checkpoint, resumed by a new run over fresh nodes (which learn who is
    who by query; FLoRA's are sent the whole merged delta): the same adapter, bitwise, and rows."""
    cfg = make_config(*OVERRIDES, "fl.rounds=3", "fl.eval_every=1", *extra)
    whole = run_in(tmp_path / "whole", cfg)
    with pytest.raises(Killed):
        run_in(tmp_path / "cut", cfg, die_at_round=2)
    assert checkpoint_rounds(tmp_path / "cut" / "checkpoints") == [1]
    assert not (tmp_path / "cut" / "metrics.jsonl").exists()  # the launcher would keep waiting
    resumed = run_in(tmp_path / "cut", cfg, resume=True)
    assert_same(resumed.state.server, whole.state.server)
    assert_same(peft_tensors(tmp_path / "cut"), peft_tensors(tmp_path / "whole"))
    assert strip_times(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == strip_times(
        read_jsonl(tmp_path / "whole" / "metrics.jsonl"))


def test_resume_refusals(tmp_path):
    cfg = make_config(*OVERRIDES, "fl.rounds=2")
    run_in(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="resume=true"):  # never overwrites a run
        run_in(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="differs in train.lr"):
        run_in(tmp_path, make_config(*OVERRIDES, "fl.rounds=2", "train.lr=0.1"), resume=True)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        run_in(tmp_path / "new", cfg, resume=True)
    fedsa = make_config(*OVERRIDES, "fl.rounds=2", "fl.method=fedsa")
    with pytest.raises(Killed):
        run_in(tmp_path / "fedsa", fedsa, die_at_round=2)
    with pytest.raises(CheckpointError, match="context.state"):
        run_in(tmp_path / "fedsa", fedsa, resume=True)


# --- DP's target and progress -------------------------------------------------------------------------
def test_target_epsilon_stops_the_flower_run_as_the_simulator(tmp_path):
    dp = ("dp.enabled=true", "dp.noise_multiplier=1.0")
    free = Simulator(prepare(make_config(*OVERRIDES, "fl.rounds=3", *dp)), "fedit").run()
    eps = [r["epsilon"] for r in free.rows if r["client"] == "server"]  # epsilon after rounds 1, 2, 3
    cfg = make_config(*OVERRIDES, "fl.rounds=4", *dp, f"dp.target_epsilon={(eps[1] + eps[2]) / 2}")
    coord = run_in(tmp_path, cfg)
    sim = Simulator(prepare(cfg), "fedit")
    ref = sim.run()
    assert coord.state.round == ref.state.round == 2
    assert_same(coord.state.server, ref.state.server)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dp"] == jsonable(sim.dp_summary(ref.state)["dp"])
    assert summary["dp"]["stopped_early"]


def test_one_progress_line_per_round(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedlora"):
        run_in(tmp_path, make_config(*OVERRIDES, "fl.rounds=2"))
    lines = [r.getMessage() for r in caplog.records if "round" in r.getMessage() and "updates" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("[fedit] round 1 | loss ")
    assert all("2 of 2 updates, 0 rejected" in line for line in lines)


# --- end to end: kill the ServerApp process, resume with a new `flwr run` ------------------------------
def serverapp_pids(dep: LocalDeployment) -> list[int]:
    """The flwr-serverapp processes below the SuperLink (its SuperExec starts them; the SuperLink
    starts the SuperExec in a session of its own, so descent is followed by parent id, not group)."""
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmd[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[:2]
            except (OSError, ValueError, IndexError):
                continue
    below, grew = {dep.procs["superlink"].pid}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in below} - below
        below |= more
        grew = bool(more)
    return [pid for pid in below if any(c.endswith(b"flwr-serverapp") for c in cmd.get(pid, []))]


@pytest.mark.flower
def test_killed_serverapp_resumes_to_the_uninterrupted_result(tmp_path):
    """FedIT, tiny model, 2 SuperNodes, 3 rounds: uninterrupted; then again, SIGKILL the ServerApp
    process once round 1's checkpoint is on disk, and `flwr run` with resume=true on the same
    SuperLink and SuperNodes. Final adapter bitwise equal, metric rows equal (times aside)."""
    cfg = make_config(*OVERRIDES, "fl.rounds=3", output_dir=tmp_path)
    with LocalDeployment(cfg, tmp_path / "whole", round_timeout=120) as dep:
        whole = dep.run_app(timeout=400)

    killed: list[int] = []

    def kill_after_round_1():
        if not killed and checkpoint_rounds(dep.output / "checkpoints"):
            for pid in serverapp_pids(dep):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if killed:
                raise Killed

    started = time.perf_counter()
    with LocalDeployment(cfg, tmp_path / "cut", round_timeout=120) as dep:
        with pytest.raises(Killed):
            dep.run_app(timeout=400, on_wait=kill_after_round_1)
        assert checkpoint_rounds(dep.output / "checkpoints") == [1] and not (dep.output / "metrics.jsonl").exists()
        out = dep.run_app(timeout=400, resume=True)
    print(f"flower kill+resume: {time.perf_counter() - started:.1f} s, killed {killed}")
    assert_same(peft_tensors(out), peft_tensors(whole))
    assert strip_times(read_jsonl(out / "metrics.jsonl")) == strip_times(read_jsonl(whole / "metrics.jsonl"))
    assert all(code in (0, -15) for code in dep.exit_codes.values()), dep.exit_codes
