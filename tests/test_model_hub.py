"""An unknown model name fails at once when the Hub cannot be used, with the fix (model/hub.py).

No test here reaches the network: conftest's autouse fixture makes the connectivity probe answer
"unreachable", and the probe's own tests replace socket.create_connection.
"""

from __future__ import annotations

import socket
import time

import pytest

from fedlora.cli import main
from fedlora.config import ModelConfig
from fedlora.fl.preflight import preflight
from fedlora.model import EMBEDDED, ModelError, list_models, load_model
from fedlora.model import hub
from fedlora.model import load as load_mod
from tests.conftest import make_config

MISSING = "no-such-org/no-such-model"
REAL_PROBE = hub._probe  # taken at import, before conftest's autouse fixture replaces it


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the environment not marked offline, and transformers forbidden."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "fedlora"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("transformers was asked to load a model the check should have refused")

    monkeypatch.setattr(load_mod.AutoTokenizer, "from_pretrained", no_network)
    return tmp_path / "hf"


def _cache_model(root, repo_id):
    snap = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")


def test_unknown_id_without_network_fails_at_once_with_the_fix(hf_cache):
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name=MISSING, device="cpu"))
    msg = str(info.value)
    assert f"model.name={MISSING!r}" in msg and "cannot be reached (tests)" in msg  # the problem
    assert f"hf download {MISSING}" in msg and f"model.name={EMBEDDED}" in msg  # the fixes
    assert str(hf_cache) in msg  # where it looked


def test_offline_env_is_trusted_without_probing(hf_cache, monkeypatch):
    def probe():
        raise AssertionError("probed although HF_HUB_OFFLINE=1 says offline")

    monkeypatch.setattr(hub, "_probe", probe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 is set"):
        hub.check_model_name(MISSING)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    with pytest.raises(ModelError, match="TRANSFORMERS_OFFLINE=true is set"):
        hub.check_model_name(MISSING)


def test_close_matches_among_cached_ids_and_the_embedded_upstream(hf_cache):
    _cache_model(hf_cache, "HuggingFaceTB/SmolLM2-360M")
    with pytest.raises(ModelError, match="did you mean HuggingFaceTB/SmolLM2-360M"):
        hub.check_model_name("HuggingFaceTB/SmolLM2-360")
    with pytest.raises(ModelError, match=f"model.name={EMBEDDED} is HuggingFaceTB/SmolLM2-135M-Instruct"):
        hub.check_model_name("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_cached_id_offline_is_read_without_asking_the_hub(hf_cache, monkeypatch):
    _cache_model(hf_cache, "someorg/cached-model")
    assert hub.check_model_name("someorg/cached-model") is True
    assert "someorg/cached-model" in {r["name"] for r in list_models()}
    seen = []

    def record(name, **kwargs):
        seen.append(kwargs)
        raise OSError("fake cache holds no tokenizer")

    monkeypatch.setattr(load_mod.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(ModelError, match="someorg/cached-model"):
        load_model(ModelConfig(name="someorg/cached-model", device="cpu"))
    assert seen == [{"local_files_only": True}]


def test_reachable_hub_leaves_the_id_to_transformers(hf_cache, monkeypatch):
    monkeypatch.setattr(hub, "_probe", lambda: None)
    assert hub.check_model_name(MISSING) is False


def test_built_in_names_and_paths_need_no_probe(tmp_path, monkeypatch):
    def probe():
        raise AssertionError("probed for a name that needs no Hub")

    monkeypatch.setattr(hub, "_probe", probe)
    for name in (EMBEDDED, "tiny", "tiny-lm", "model.gguf", str(tmp_path)):
        assert hub.check_model_name(name) is False
    with pytest.raises(ModelError, match="does not exist"):
        hub.check_model_name(str(tmp_path / "gone"))
    with pytest.raises(ModelError, match="did you mean tiny-lm"):
        hub.check_model_name("tiny_lm")


def test_preflight_and_cli_fail_before_data_is_loaded(hf_cache, monkeypatch, capsys):
    import fedlora.fl.federation as federation

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the model name was checked")

    monkeypatch.setattr(federation, "load_table", no_data)
    with pytest.raises(ModelError, match=MISSING):
        preflight(make_config(f"model.name={MISSING}"))
    preflight(make_config(f"model.name={MISSING}"), model=False)  # `config show` needs no model
    started = time.perf_counter()
    assert main(["run", "tiny", "--set", f"model.name={MISSING}", "--quiet"]) == 2
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.name={MISSING!r}") and "hf download" in err
    assert elapsed < 30, elapsed  # a network retry loop takes about a minute; loose for a busy CI


def test_probe_reports_refusal_and_gives_up_on_a_hang(monkeypatch):
    probe = REAL_PROBE.__wrapped__  # the real probe, without the per-process cache
    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.05)

    def refused(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert probe() == "huggingface.co:443 cannot be reached (Connection refused)"
    class Conn:
        def close(self):
            pass

    def hang(address, timeout):  # a DNS lookup that never answers, as on a machine with no network
        time.sleep(1)
        return Conn()

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    started = time.perf_counter()
    assert probe() == "hub.example:8443 did not answer within 0.05 s"
    assert time.perf_counter() - started < 0.5
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Conn())
    assert probe() is None
