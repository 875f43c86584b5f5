"""The command line is a thin layer over the Python API: exit codes, messages, run directories."""

from __future__ import annotations

import json

import pytest

from fedlora import available_methods
from fedlora.cli import main, shipped_configs

# Smaller than configs/tiny.yaml (one round, one local step) to keep the CLI runs to a second.
FAST = ["--set", "fl.rounds=1", "--set", "train.local_steps=1", "--set", "eval.max_examples=8"]


def _run_dirs(root):
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_run_shipped_tiny(tmp_path, capsys):
    assert "tiny" in shipped_configs()
    code = main(["run", "tiny", "--set", f"output_dir={tmp_path}", *FAST, "--quiet"])
    assert code == 0
    dirs = _run_dirs(tmp_path)
    assert len(dirs) == 1 and dirs[0].name.startswith("fedit-")
    assert (dirs[0] / "summary.json").is_file() and (dirs[0] / "metrics.jsonl").is_file()
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["method"] == "fedit" and summary["rounds"] == 1
    assert f"results: {dirs[0]}" in capsys.readouterr().out


def test_run_with_quiet_before_subcommand_and_yaml_path(tmp_path):
    from fedlora.cli import shipped_configs as shipped

    code = main(["--quiet", "run", str(shipped()["tiny"]), "--set", f"output_dir={tmp_path}",
                 "--set", "run_name=named", "--set", "fl.method=local", *FAST])
    assert code == 0
    assert (tmp_path / "named" / "adapters" / "client_0").is_dir()


@pytest.mark.parametrize("command", ["methods", "datasets"])
def test_listing_commands(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps table cells to the terminal width
    assert main([command]) == 0
    out = capsys.readouterr().out
    if command == "methods":
        assert all(m in out for m in available_methods())
    else:
        assert "breast-cancer" in out and "german-credit" in out


def test_bad_override_returns_2_and_names_key(tmp_path, capsys):
    code = main(["run", "tiny", "--set", f"output_dir={tmp_path}", "--set", "fl.roundz=3", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fl.roundz" in err
    assert _run_dirs(tmp_path) == []  # nothing was written


def test_override_without_equals_returns_2(capsys):
    assert main(["run", "tiny", "--set", "fl.rounds", "--quiet"]) == 2
    assert "fl.rounds" in capsys.readouterr().err


def test_unknown_method_returns_2(tmp_path, capsys):
    assert main(["run", "tiny", "--set", f"output_dir={tmp_path}", "--set", "fl.method=nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "fedit" in err
    assert _run_dirs(tmp_path) == []


def test_missing_yaml_file(capsys):
    assert main(["run", "nonexistent.yaml", "--quiet"]) == 2
    assert "nonexistent.yaml" in capsys.readouterr().err


def test_unknown_config_name_exits_with_shipped_list():
    with pytest.raises(SystemExit) as info:
        main(["run", "nonexistent", "--quiet"])
    message = str(info.value.code)
    assert "nonexistent" in message and "tiny" in message


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err
