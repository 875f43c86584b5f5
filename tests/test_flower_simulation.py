"""fedlora on Flower's own simulation engine (Ray): the same ServerApp and ClientApp, virtual nodes.

Two ways in, both real processes: `fedlora flower simulate` (our launcher: a SuperLink started
with `--simulation`, then `flwr run --federation-config "num-supernodes=N ..."`), and Flower's
own `flwr run APP local`, which starts Flower's managed local SuperLink in simulation mode
(FLWR_HOME and its ports redirected to the test's). Each must give the simulator's result
bitwise: one Site per Ray actor serves every partition it is handed (flower/node.py), and the
model sits in the same state for each client's round as in the simulator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

from conftest import make_config, strip_times  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora import prepare  # noqa: E402
from fedlora.fl.checkpoint import load_latest  # noqa: E402
from fedlora.fl.engine import Simulator  # noqa: E402
from fedlora.flower.app_folder import write_app  # noqa: E402
from fedlora.flower.deploy import free_port  # noqa: E402
from fedlora.jsonio import read_jsonl  # noqa: E402

FLOWER_OVERRIDES = ("fl.eval_every=0", "eval.global_test=false")  # as tests/test_flower.py


def _server_state(out: Path) -> dict[str, torch.Tensor]:
    """The server's tensors after the last round: the PEFT global adapter, or for a personalized
    method (no global adapter) the last checkpoint's server state."""
    peft = out / "adapters" / "global" / "adapter_model.safetensors"
    if peft.exists():
        return {k[len("base_model.model."):-len(".weight")]: v for k, v in load_file(str(peft)).items()}
    return load_latest(out / "checkpoints").fields["server"]


def _assert_simulators_result(out: Path, cfg) -> list[dict]:
    ref = Simulator(prepare(cfg), cfg.fl.method).run()
    got = _server_state(out)
    assert sorted(got) == sorted(ref.state.server)
    assert all(torch.equal(got[k], ref.state.server[k]) for k in got), "simulation differs from the simulator"
    rows = read_jsonl(out / "metrics.jsonl")
    clients = [r for r in strip_times(rows) if r["client"] != "server"]
    assert clients == [r for r in strip_times(ref.rows) if r["client"] != "server"]
    return [r for r in rows if r["client"] == "server"]


@pytest.mark.flower
def test_fedlora_flower_simulate_equals_the_simulator(tmp_path, capsys):
    """`fedlora flower simulate` with 3 virtual nodes on 2 one-CPU Ray actors: every actor
    answers for several partitions and prepares the model once, and the result is the simulator's bitwise: FedSA-LoRA,
    so each virtual node's B also lives on across rounds in its own context.state."""
    from fedlora.cli import main

    cfg = make_config("partition.num_clients=3", "fl.method=fedsa", *FLOWER_OVERRIDES, output_dir=tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["flower", "simulate", str(config), "--out", str(tmp_path / "sim"), "--timeout", "600"]) == 0
    assert "simulation engine (Ray): 3 virtual SuperNodes" in capsys.readouterr().out
    servers = _assert_simulators_result(tmp_path / "sim" / "output", cfg)
    assert [s["replies"] for s in servers] == [3, 3]
    # Nodes report their preparation seconds once per Site (summed in the server row): round 1's
    # messages prepared the actors' models, round 2's found them cached (keyed by partition id,
    # as before, most round-2 messages went to an actor that had prepared another partition).
    assert servers[0]["time_node_prepare"] > 0 and servers[1]["time_node_prepare"] == 0
    assert (tmp_path / "sim" / "output" / "report.html").exists()


def _kill_sessions_mentioning(text: str) -> None:
    """Stop Flower's managed local SuperLink (detached, its own session) and what it spawned."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in (proc.info["cmdline"] or [])):
            try:
                os.killpg(os.getpgid(proc.info["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.flower
def test_flwr_run_local_simulation_with_run_config_overrides(tmp_path):
    """The user's path: `flwr run APP local --federation-config "num-supernodes=2"
    --run-config "fl.rounds=1 ..."` on the folder `fedlora flower app` writes. Flower starts its
    managed simulation SuperLink itself; the run-config override reaches the ServerApp and the
    ClientApps (one round, the simulator's one-round result)."""
    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    out = tmp_path / "output"
    app = write_app(cfg, tmp_path / "app", out, round_timeout=120)
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        submit = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(app), "local",
                                 "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
                                 "--run-config", 'fl.rounds=1 train.lr=0.02 data.number_format="digits"',
                                 "--format", "json"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 0 and json.loads(submit.stdout)["success"], submit.stdout + submit.stderr
        deadline = time.monotonic() + 420
        while not (out / "metrics.jsonl").exists():
            assert not (out / "error.txt").exists(), (out / "error.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no metrics.jsonl from the simulation run"
            time.sleep(0.5)
    finally:
        _kill_sessions_mentioning(str(home))
    expected = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, "fl.rounds=1", "train.lr=0.02",
                           output_dir=tmp_path)
    servers = _assert_simulators_result(out, expected)
    assert len(servers) == 1 and servers[0]["replies"] == 2
