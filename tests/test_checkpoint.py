"""Checkpoints (fl/checkpoint.py) and `fedlora resume`: exact round trips, atomic layout, checksum
fallback, and a run killed with SIGKILL mid-round that, resumed, ends bit for bit like an
uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, make_config, strip_times
from fedlora import resume, run
from fedlora.cli import main
from fedlora.fl.checkpoint import (CheckpointError, checkpoint_rounds, load_latest, read_checkpoint, round_dir,
                                   save_checkpoint)
from fedlora.fl.methods import ClientUpdate

SRC = Path(__file__).resolve().parents[1] / "src" / "fedlora"


def _same(a, b) -> bool:
    """Deep equality with tensors compared bitwise (dtype and shape included) and NaN == NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, ClientUpdate):
        return type(b) is ClientUpdate and _same(vars(a), vars(b))
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return type(a) is type(b) and a == b


def _adamw_state(steps: int = 3) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95))
    for _ in range(steps):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    return p, opt


def test_adamw_state_round_trips_exactly(tmp_path):
    """Integer parameter ids, tuple betas, tensor step: equal after the trip, and the next steps agree."""
    p, opt = _adamw_state()
    state = opt.state_dict()
    save_checkpoint(tmp_path, 1, {"optimizer": [state, None]}, [], {})
    back = read_checkpoint(round_dir(tmp_path, 1)).fields["optimizer"][0]
    assert _same(state, back)
    assert isinstance(back["param_groups"][0]["betas"], tuple) and 0 in back["state"]
    q = torch.nn.Parameter(p.detach().clone())
    other = torch.optim.AdamW([q], lr=0.01, betas=(0.8, 0.95))
    other.load_state_dict(back)
    for param, optimizer in ((p, opt), (q, other)):
        optimizer.zero_grad()
        (param ** 3).sum().backward()
        optimizer.step()
    assert torch.equal(p, q)


def test_generic_values_round_trip(tmp_path):
    fields = {
        "tensors": {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.tensor(1.5, dtype=torch.bfloat16),
                    "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])},
        "weird_keys": {"__step__": torch.tensor(3), 7: "seven", "plain": None},
        "numbers": [1, 2.5, float("nan"), float("inf"), True, None, "text", (1, (2, 3))],
        "array": np.arange(5, dtype=np.float32),
        "update": ClientUpdate(2, {"x": torch.ones(2)}, 5),
    }
    save_checkpoint(tmp_path, 3, fields, [{"round": 1, "client": "server", "sampled": [0, 1]}], {"seed": 0})
    ck = read_checkpoint(round_dir(tmp_path, 3))
    assert _same(fields, ck.fields)
    assert ck.round == 3 and ck.rows == [{"round": 1, "client": "server", "sampled": [0, 1]}]
    aliased = torch.ones(3)
    save_checkpoint(tmp_path, 4, {"server": {"a": aliased}, "clients": [{"a": aliased}]}, [], {})  # shared storage
    assert torch.equal(read_checkpoint(round_dir(tmp_path, 4)).fields["clients"][0]["a"], aliased)


def test_unsupported_value_names_its_place(tmp_path):
    with pytest.raises(TypeError, match=r"state\.server\.x.*object"):
        save_checkpoint(tmp_path, 1, {"server": {"x": object()}}, [], {})
    assert not checkpoint_rounds(tmp_path)


def test_layout_keeps_newest_and_checksums(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, {"round": r, "x": torch.full((2,), float(r))}, [], {}, keep=2)
    (tmp_path / ".tmp-round-0009").mkdir()  # a half-written one from a crash is ignored, then cleaned
    assert checkpoint_rounds(tmp_path) == [2, 3]
    manifest = json.loads((round_dir(tmp_path, 3) / "manifest.json").read_text())
    assert manifest["round"] == 3 and set(manifest["files"]) == {"state.safetensors", "state.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert load_latest(tmp_path).fields["round"] == 3
    save_checkpoint(tmp_path, 4, {"round": 4}, [], {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0003", "round-0004"]
    # Resumed from round 2 (3 and 4 damaged): writing round 3 again drops the abandoned round 4.
    save_checkpoint(tmp_path, 3, {"round": 3}, [], {}, keep=2)
    assert checkpoint_rounds(tmp_path) == [3]


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate_tensors", "flip_json_byte", "no_manifest"])
def test_damaged_newest_falls_back_with_warning(tmp_path, caplog, damage):
    for r in (1, 2):
        save_checkpoint(tmp_path, r, {"round": r, "x": torch.arange(100.0) * r}, [], {}, keep=2)
    newest = round_dir(tmp_path, 2)
    if damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        path = newest / ("state.json" if damage == "flip_json_byte" else "state.safetensors")
        data = bytearray(path.read_bytes())
        if damage == "truncate_tensors":
            data = data[: len(data) // 2]
        else:
            data[len(data) - 10] ^= 0x01
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        ck = load_latest(tmp_path)
    assert ck.round == 1 and torch.equal(ck.fields["x"], torch.arange(100.0))
    assert any("round-0002" in m and "falling back" in m for m in caplog.messages)


def test_checksummed_but_unparsable_content_is_skipped(tmp_path):
    """A writer bug, not disk damage: the manifest matches, the content does not parse."""
    import hashlib

    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, [], {})
    folder = round_dir(tmp_path, 1)
    bad = b"not json"
    (folder / "state.json").write_bytes(bad)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(bad).hexdigest(), "bytes": len(bad)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not parse"):
        read_checkpoint(folder)


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="none found"):
        load_latest(tmp_path / "checkpoints")
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, [], {})
    (round_dir(tmp_path, 1) / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="1 found, none valid"):
        load_latest(tmp_path)


def test_checkpoint_module_reads_only_safetensors_and_json():
    """No code-executing deserializer anywhere in the checkpoint path (scanned, not just trusted)."""
    text = (SRC / "fl" / "checkpoint.py").read_text()
    for banned in ("pickle", "torch.load", "torch.save", "np.load", "allow_pickle", "eval(", "exec("):
        assert banned not in text, banned


# --- end to end: experiment.run / resume -------------------------------------------------------------

def _outputs(run_dir: Path) -> dict:
    """What a finished run leaves: metric rows (no times), summary (no wall time), adapter tensors."""
    rows = strip_times([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_seconds")
    adapters = {}
    for path in sorted((run_dir / "adapters").rglob("*")):
        if path.suffix == ".safetensors":
            adapters[str(path.relative_to(run_dir))] = path.read_bytes()
        elif path.name == "adapter_config.json":
            config = json.loads(path.read_text())
            config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set: order varies
            adapters[str(path.relative_to(run_dir))] = config
    return {"rows": rows, "summary": summary, "adapters": adapters}


def test_resume_after_corrupted_newest_checkpoint_gives_same_run(tmp_path, caplog):
    cfg = make_config("run_name=c", "fl.rounds=3", "train.optimizer_state=keep", "eval.zero_shot=false",
                      "eval.baseline=none", output_dir=tmp_path)
    run_dir = run(cfg, quiet=True)
    expected = _outputs(run_dir)
    assert checkpoint_rounds(run_dir / "checkpoints") == [2, 3]
    state = round_dir(run_dir / "checkpoints", 3) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-7])  # truncated newest: round 3 is run again from round 2
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "client": "half-written"}\n')
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        assert resume(run_dir, quiet=True) == run_dir
    assert any("round-0003" in m and "checksum" in m for m in caplog.messages)
    assert _outputs(run_dir) == expected
    assert read_checkpoint(round_dir(run_dir / "checkpoints", 3)).round == 3  # rewritten, valid again


def test_resume_refuses_another_config(tmp_path):
    cfg = make_config("run_name=x", "fl.rounds=1", "eval.zero_shot=false", "eval.baseline=none",
                      output_dir=tmp_path)
    run_dir = run(cfg, quiet=True)
    text = (run_dir / "config.yaml").read_text().replace("lr: 0.005", "lr: 0.5")
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="another config"):
        resume(run_dir, quiet=True)


def test_resume_checks_method_and_seed(fed, tmp_path):
    from fedlora.experiment import run_method

    save_checkpoint(tmp_path / "c", 1, {}, [], {"method": "fedit", "seed": 0})
    ck = read_checkpoint(round_dir(tmp_path / "c", 1))
    for method, seed in (("local", 0), ("fedit", 1)):
        with pytest.raises(CheckpointError, match="was written by fedit with seed 0"):
            run_method(fed, method, tmp_path / "m", quiet=True, seed=seed, resume_from=ck)
    assert not (tmp_path / "m" / "metrics.jsonl").exists()  # refused before touching anything
    assert main(["resume", str(tmp_path / "nothing")]) == 2


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
    """`fedlora run` in a subprocess, SIGKILL'd during round 3 of 4, then `resume`: same metrics and adapters."""
    overrides = [*TINY_OVERRIDES, "fl.rounds=4", "train.local_steps=3", "train.optimizer_state=keep",
                 "model.num_threads=1", "eval.zero_shot=false", "eval.baseline=none"]
    cfg = make_config(*overrides[len(TINY_OVERRIDES):], "run_name=reference", output_dir=tmp_path)
    reference = _outputs(run(cfg, quiet=True))

    args = [sys.executable, "-m", "fedlora.cli", "--quiet", "run", "configs/tiny.yaml",
            *[f"--set={o}" for o in [*overrides, f"output_dir={tmp_path}", "run_name=killed"]]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(args, cwd=SRC.parents[1], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "round-0002").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # round 3 has started: round 2's checkpoint is its last step
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # it really died before the end
    # Killed inside round 3: round 2 is the last checkpoint and the last round with metric rows.
    assert max(checkpoint_rounds(run_dir / "checkpoints")) == 2
    written = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row["round"] for row in written) == 2
    assert main(["--quiet", "resume", str(run_dir)]) == 0  # the CLI, in this process
    assert _outputs(run_dir) == reference


def test_checkpoint_off_writes_none(tmp_path):
    cfg = make_config("run_name=no-ckpt", "fl.rounds=1", "fl.checkpoint=false", "eval.zero_shot=false",
                      "eval.baseline=none", output_dir=tmp_path)
    run_dir = run(cfg, quiet=True)
    assert not (run_dir / "checkpoints").exists()
    with pytest.raises(CheckpointError, match="none found"):
        resume(run_dir, quiet=True)


def test_a_checkpoint_from_before_a_new_config_key_still_resumes():
    """A key a newer fedlora added (e.g. fl.sampling) is no difference while it has its default."""
    from fedlora.config import RunConfig
    from fedlora.experiment import config_differences

    default = json.loads(json.dumps(RunConfig().to_dict()))
    old = json.loads(json.dumps(default))
    del old["fl"]["sampling"], old["fl"]["max_examples"]
    assert config_differences(old, default, default) == []
    changed = json.loads(json.dumps(default))
    changed["fl"]["sampling"] = "fixed"
    changed["fl"]["rounds"] = 99
    assert config_differences(old, changed, default) == ["fl.rounds", "fl.sampling"]
