"""Typed config: shipped YAML files, unknown keys, types, choices, overrides, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import ConfigError, RunConfig, load_config
from fedlora.cli import shipped_configs
from fedlora.config import apply_overrides
from fedlora.fl.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_the_packaged_one():
    assert SHIPPED, "no configs shipped"
    assert (REPO / "configs").resolve() == (REPO / "src" / "fedlora" / "configs").resolve()
    assert set(shipped_configs()) == {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    preflight(cfg)  # its topology builds on its clients, its attack is registered
    from fedlora import available_methods

    assert cfg.fl.method in available_methods()
    assert cfg.model.name.strip()


def test_tiny_yaml_values():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.model.name == "tiny" and cfg.lora.r == 4 and cfg.lora.alpha == 8.0
    assert isinstance(cfg.lora.alpha, float) and isinstance(cfg.train.lr, float)
    assert cfg.data.columns[0] == "mean radius" and len(cfg.data.columns) == 5
    assert cfg.fl.rounds == 2 and cfg.partition.num_clients == 3


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == RunConfig()


def test_unknown_key_names_it_and_lists_valid(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fl:\n  roundz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "fl.roundz" in msg and "rounds" in msg and "method_args" in msg
    with pytest.raises(ConfigError, match="unknown config key bogus.*valid keys under the top level.*seed"):
        load_config(None, ["bogus=1"])


@pytest.mark.parametrize("override, key", [
    ("fl.rounds=abc", "fl.rounds"),
    ("fl.rounds=2.5", "fl.rounds"),
    ("eval.zero_shot=3", "eval.zero_shot"),
    ("lora.target_modules={a: 1}", "lora.target_modules"),
    ("fl.method_args=[1, 2]", "fl.method_args"),
    ("fl=3", "fl"),
    ("partition.num_clients=true", "partition.num_clients"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"partition\.scheme: 'foo' is not one of \['column', 'dirichlet', 'iid', 'quantity'\]"):
        load_config(None, ["partition.scheme=foo"])
    with pytest.raises(ConfigError, match="train.optimizer_state"):
        load_config(None, ["train.optimizer_state=sometimes"])


def test_overrides_parse_values():
    cfg = load_config(None, [
        "fl.rounds=3", "train.lr=0.001", "lora.alpha=16", "eval.zero_shot=false",
        "lora.target_modules=[q_proj, k_proj]", "data.columns=a,b , c", "data.max_rows=null",
        "fl.method_args={mu: 0.1}", "run_name=exp1", "seed=7", "model.num_threads=2",
        "data.target=",
    ])
    assert cfg.fl.rounds == 3 and isinstance(cfg.fl.rounds, int)
    assert cfg.train.lr == 0.001 and cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.eval.zero_shot is False
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.data.columns == ["a", "b", "c"]
    assert cfg.data.max_rows is None and cfg.data.target is None
    assert cfg.fl.method_args == {"mu": 0.1}
    assert cfg.run_name == "exp1" and cfg.seed == 7 and cfg.model.num_threads == 2


def test_later_override_wins_and_overrides_beat_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fl:\n  rounds: 4\n  method: local\n")
    cfg = load_config(path, ["fl.rounds=2", "fl.rounds=6"])
    assert cfg.fl.rounds == 6 and cfg.fl.method == "local"


@pytest.mark.parametrize("value", ["1e-3", "5e-4", "2E-5"])
def test_scientific_notation_floats(value, tmp_path):
    """`--set train.lr=1e-3` and `lr: 5e-4` in YAML are floats (PyYAML reads them as strings)."""
    expected = float(value)
    assert load_config(None, [f"train.lr={value}"]).train.lr == pytest.approx(expected)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {value}\n")
    assert load_config(path).train.lr == pytest.approx(expected)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["fl.rounds"])


def test_override_into_non_section():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize("override, message", [
    ("fl.rounds=0", "fl.rounds must be >= 1"),
    ("fl.client_fraction=0", "client_fraction"),
    ("fl.client_fraction=1.5", "client_fraction"),
    ("partition.num_clients=0", "num_clients"),
    ("partition.alpha=0", "partition.alpha"),
    ("train.batch_size=0", "batch_size"),
    ("train.local_steps=0", "local_steps"),
    ("train.lr=0", "train.lr"),
    ("lora.r=0", "lora.r"),
    ("lora.target_modules=[]", "target_modules"),
    ("data.global_test_fraction=1", "global_test_fraction"),
    ("data.val_fraction=0.5", "val_fraction"),
    ("partition.scheme=column", "partition.column"),
])
def test_cross_field_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override, "data.test_fraction=0.5"] if "val_fraction" in override else [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("fl: 3\n")
    with pytest.raises(ConfigError, match="fl"):
        load_config(scalar)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_imports_nothing_else_from_fedlora():
    """The config package is the bottom layer: checks needing other modules live in fl/preflight.py."""
    import ast

    for path in (REPO / "src" / "fedlora" / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[:2]
                assert top[0] != "fedlora" or top == ["fedlora", "config"], f"{path.name} imports {name}"


def test_prepare_runs_preflight_before_loading_anything(monkeypatch):
    import fedlora.fl.federation as federation
    from fedlora import prepare

    monkeypatch.setattr(federation, "load_table", lambda *a, **k: pytest.fail("prepare loaded the table first"))
    cfg = load_config(None, ["topology.graph=torus", "partition.num_clients=7"])  # 7 is prime: no torus
    with pytest.raises(ConfigError, match="torus"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="robust.attack"):
        prepare(load_config(None, ["robust.byzantine=1", "robust.attack=nope"]))
