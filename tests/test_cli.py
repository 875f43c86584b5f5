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


# ------------------------------------------------------------------ a CLI without surprises

def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from fedlora import __version__

    assert capsys.readouterr().out.strip() == f"fedlora {__version__}"


def test_config_show_prints_resolved_yaml(capsys):
    import yaml

    assert main(["config", "show", "tiny", "--set", "fl.rounds=7", "--set", "data.max_rows=50"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["fl"]["rounds"] == 7 and shown["data"]["max_rows"] == 50 and shown["model"]["name"] == "tiny"
    assert main(["config", "show", "tiny", "--set", "fl.bogus=1"]) == 2


def test_load_config_takes_a_shipped_name():
    from fedlora import load_config
    from fedlora.config import ConfigError

    assert load_config("tiny").model.name == "tiny"
    assert load_config("tiny") == load_config(shipped_configs()["tiny"])
    with pytest.raises(ConfigError, match=r"no config file 'tinyy'.*did you mean tiny\?"):
        load_config("tinyy")


def test_close_match_suggestions(capsys):
    assert main(["run", "tiny", "--set", "fl.method=fedavg", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'fedavg'; did you mean fedit or fedavgm" in err and "available:" in err
    assert main(["compare", "tiny", "--methods", "fedit,fedsaa", "--quiet"]) == 2
    assert "unknown method 'fedsaa'; did you mean fedsa" in capsys.readouterr().err
    assert main(["run", "tiny", "--set", "fl.rounnds=2", "--quiet"]) == 2
    assert "unknown config key fl.rounnds (did you mean fl.rounds?)" in capsys.readouterr().err
    assert main(["run", "tiny", "--set", "model.name=tinny", "--quiet"]) == 2
    assert "unknown model name 'tinny'; did you mean tiny?" in capsys.readouterr().err


def _patients(tmp_path):
    rows = "".join(f"{30 + i % 40},{'yes' if i % 3 else 'no'},{i % 7},{'sick' if i % 2 else 'well'}\n"
                   for i in range(80))
    path = tmp_path / "patients.csv"
    path.write_text("age,smoker,visits,outcome\n" + rows, encoding="utf-8")
    return path


def test_data_and_target_options(tmp_path, capsys):
    path = _patients(tmp_path)
    # tiny's own data.columns and target belong to breast-cancer: --data resets them
    assert main(["run", "tiny", "--data", str(path), "--quiet", "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "no target column given; pass --target NAME" in err and "age, smoker, visits, outcome" in err
    code = main(["run", "tiny", "--data", str(path), "--target", "outcome", "--quiet",
                 "--set", f"output_dir={tmp_path / 'o'}", *FAST])
    assert code == 0
    import yaml

    (run_dir,) = _run_dirs(tmp_path / "o")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert saved["source"] == str(path) and saved["target"] == "outcome" and saved["columns"] is None
    assert main(["run", "tiny", "--data", str(path), "--target", "outcme", "--quiet"]) == 2
    assert "target column 'outcme' not found" in capsys.readouterr().err


def test_data_option_keeps_explicit_set_and_same_source(tmp_path, capsys):
    from fedlora.cli import _overrides, _parser

    path = str(_patients(tmp_path))
    args = _parser().parse_args(["compare", "tiny", "--data", path, "--set", "data.columns=[age]"])
    sets = _overrides(args, shipped_configs()["tiny"])
    assert sets[:2] == ["data.columns=null", "data.target=null"] and sets[-1] == "data.columns=[age]"
    args = _parser().parse_args(["demo", "--data", "breast-cancer", "--target", "mean radius"])
    assert _overrides(args, shipped_configs()["demo"]) == ['data.source="breast-cancer"',
                                                          'data.target="mean radius"']


def test_bad_data_paths_are_one_line_errors(tmp_path, capsys):
    assert main(["run", "tiny", "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err
    cut = tmp_path / "cut.csv"
    cut.write_text("age,outcome\n" + "".join(f"{i},{'NO' if i % 2 else 'YES'}\n" for i in range(20)) + "22,N")
    assert main(["run", "tiny", "--data", str(cut), "--target", "outcome", "--quiet"]) == 2
    assert "row 21 (line 22" in capsys.readouterr().err
