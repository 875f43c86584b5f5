"""Saved adapters describe themselves and load anywhere: plain PEFT, AutoPeft, merged models.

For every registered method, one short run on the tiny federation is saved; each saved folder is
loaded with `PeftModel.from_pretrained` onto a fresh tiny base and must give the logits fedlora's
own model gives with that adapter (FLoRA: W0 + (alpha / r) D with a zero adapter; FedTreeLoRA: the
mixing layer attached). Tolerance: 1e-5 absolute on logits of magnitude ~1 (fp32 rounding of the
same products in another order; a dropped or mis-scaled adapter moves them by >= 1e-3, checked).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_config, wrapped_tiny
from fedlora import available_methods
from fedlora.cli import main
from fedlora.experiment import run_method
from fedlora.fl.methods import build_method, method_options
from fedlora.model import build_tiny_model, cache_dir
from fedlora.model.export import UPSTREAM, base_model_id, export_merged, fold_mixing, svd_lora, write_peft
from fedlora.model.lora import adapter_parameters, adapter_state, base_weights, load_adapter_state, set_base_weights
from fedlora.model.mixing import attach_mixing, detach_mixing
from fedlora.fl.cuma_setup import sync_cuma
from fedlora.model.cuma import detach_cuma
from fedlora.model.cuma_io import load_cuma

ATOL = 1e-5
MERGED_ATOL = 1e-4  # merged weights round W + s B A once in fp32, unlike the unmerged forward
# Enough training that every adapter moves the logits far beyond ATOL (1 round, 3 clients).
FAST = ["fl.rounds=1", "train.lr=0.05", "train.local_steps=2", "eval.zero_shot=false", "eval.baseline=none"]
CASES = {m: [] for m in available_methods()}
CASES["fedtree"] = ["fl.rounds=2", "fl.method_args={mode: fixed, fixed_clusters: 2}"]  # mixed layers, trained lambdas
CASES["cuma"] = ["cuma.use_profile=false"]  # semantic-only routing: the logits need no profile embedding
CASES["flora_full_rank"] = ["fl.method=flora", "fl.method_args={export_rank: 64}"]  # SVD exact at full rank


def _ids(fed) -> torch.Tensor:
    return fed.tokenizer("mean radius is 17.99. mean texture is 10.38. Answer: malignant",
                         return_tensors="pt")["input_ids"]


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def saved(fed, tmp_path_factory):
    """Memoized runs: case -> (run_dir, federation, method object, final state)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            extra = CASES[case]
            method = next((o.split("=", 1)[1] for o in extra if o.startswith("fl.method=")), case)
            cfg = make_config(*FAST, f"fl.method={method}", *extra)
            f = dataclasses.replace(fed, cfg=cfg)
            out = tmp_path_factory.mktemp(case)
            result = run_method(f, method, out, quiet=True)
            cache[case] = (out, f, build_method(method, method_options(cfg, method)), result.state)
        return cache[case]

    return get


def _folders(run_dir):
    return sorted(p for p in (run_dir / "adapters").iterdir() if p.is_dir())


def _fedlora_logits(fed, method, state, adapter: str, ids) -> torch.Tensor:
    """What fedlora's shared model computes with the run's final adapter `adapter` (restored after)."""
    model, server = fed.model, state.server
    if getattr(method, "model_layer", None) == "cuma":
        sync_cuma(fed, method, fed.cfg.seed)
        try:
            load_adapter_state(model, method.global_adapter(server))
            return _logits(model, ids)
        finally:
            detach_cuma(model)
    delta = method.base_delta(server)
    if adapter == "global":
        backup = base_weights(model, sorted(delta)) if delta is not None else None
        try:
            if backup is not None:
                set_base_weights(model, backup, delta)
            load_adapter_state(model, method.global_adapter(server))
            return _logits(model, ids)
        finally:
            if backup is not None:
                set_base_weights(model, backup)
    personal = method.personal_adapter(server, state.clients[int(adapter.split("_")[1])])
    try:
        layers = method.mixing_layers(server)
        if layers:
            attach_mixing(model, layers)
        load_adapter_state(model, personal)
        return _logits(model, ids)
    finally:
        detach_mixing(model)


def _peft(folder) -> PeftModel:
    return PeftModel.from_pretrained(build_tiny_model(0)[0], str(folder)).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_adapters_load_with_peft_and_give_fedlora_logits(saved, fed, case):
    run_dir, f, method, state = saved(case)
    folders = _folders(run_dir)
    assert folders
    ids = _ids(fed)
    base = _logits(build_tiny_model(0)[0], ids)
    for folder in folders:
        expected = _fedlora_logits(f, method, state, folder.name, ids)
        assert (expected - base).abs().max() > 100 * ATOL, f"{case}: the adapter barely moves the logits"
        info = json.loads((folder / "fedlora.json").read_text())
        if info.get("form") == "svd" and info["relative_error"] > 1e-6:
            continue  # truncated: checked against its stated error in test_flora_svd_error_is_the_stated_one
        if info.get("form") == "cuma":  # experts and routers in CuMA's own format, never a PEFT folder
            assert not (folder / "adapter_config.json").exists()
            reloaded, _ = load_cuma(build_tiny_model(0)[0], folder)
            torch.testing.assert_close(_logits(reloaded.eval(), ids), expected, atol=ATOL, rtol=0)
            continue
        torch.testing.assert_close(_logits(_peft(folder), ids), expected, atol=ATOL, rtol=0)


def test_flora_svd_error_is_the_stated_one(saved, fed):
    """At rank lora.r the SVD adapter's update differs from the exact delta by the stated error."""
    run_dir, f, method, state = saved("flora")
    folder = run_dir / "adapters" / "global"
    info = json.loads((folder / "fedlora.json").read_text())
    assert info["rank"] == 4 and 0 < info["relative_error"] < 1  # a 1-round stack of 3 rank-4 LoRAs: rank 12
    merged = _peft(folder).merge_and_unload().state_dict()
    w0 = build_tiny_model(0)[0].state_dict()
    from safetensors.torch import load_file

    exact = load_file(str(folder / "base_delta.safetensors"))
    lost = total = 0.0
    for module, err in info["module_errors"].items():
        d, got = exact[f"{module}.weight"], merged[f"{module}.weight"] - w0[f"{module}.weight"]
        assert abs(float((got - d).norm() / d.norm()) - err) < 1e-4
        lost, total = lost + float((got - d).norm()) ** 2, total + float(d.norm()) ** 2
    assert abs((lost / total) ** 0.5 - info["relative_error"]) < 1e-4


def test_fold_mixing_is_exact_for_any_lambda(tmp_path):
    """Random experts and lambda = sigmoid(0.7) on block 1: the folded plain LoRA gives the mixture's logits."""
    model, tok = wrapped_tiny(seed=3)
    attach_mixing(model, [1], logit_init=0.7)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if not name.endswith("mix_logit"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    ids = tok("Question: Is the patient benign? Answer:", return_tensors="pt")["input_ids"]
    expected = _logits(model, ids)
    lora = make_config().lora
    factors, ranks, alphas = fold_mixing(adapter_state(model), lora)
    detach_mixing(model)
    assert set(ranks) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert set(ranks.values()) == {8} and set(alphas.values()) == {16.0}
    write_peft(tmp_path, factors, lora, "fedlora:tiny", rank_pattern=ranks, alpha_pattern=alphas)
    torch.testing.assert_close(_logits(_peft(tmp_path), ids), expected, atol=ATOL, rtol=0)


def test_svd_lora_known_answer():
    """diag(3, 2, 1) at rank 2 keeps 3 and 2: error 1 / sqrt(14); at rank 3 it is exact."""
    d = {"m": torch.diag(torch.tensor([3.0, 2.0, 1.0]))}
    factors, k, errors = svd_lora(d, 2)
    assert k == 2 and abs(errors["overall"] - 14 ** -0.5) < 1e-7
    torch.testing.assert_close(factors["m.lora_B"] @ factors["m.lora_A"], torch.diag(torch.tensor([3.0, 2.0, 0.0])))
    _, k, errors = svd_lora(d, 10)
    assert k == 3 and errors["overall"] < 1e-7


def test_base_model_id_is_real_and_never_a_cache_path(tmp_path, monkeypatch):
    assert base_model_id("smollm2-135m") == base_model_id(" SmolLM2-135M ") == UPSTREAM
    assert base_model_id("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert base_model_id("tiny") == "fedlora:tiny" and base_model_id("tiny-lm") == "fedlora:tiny-lm"
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_id("my-model") == str(tmp_path / "my-model")  # the path the user gave, made absolute


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_config_and_card_describe_the_run(saved, fed, case):
    run_dir, f, method, state = saved(case)
    summary = json.loads((run_dir / "summary.json").read_text())
    values = {str(v) for v in fed.table.frame.drop(columns=[fed.table.target]).to_numpy().ravel()
              if "." in str(v) and len(str(v)) >= 4}  # the rows' feature values, e.g. '17.99' (not '0.0')
    for folder in _folders(run_dir):
        card = (folder / "README.md").read_text()
        if method.name == "cuma":
            assert "load_cuma" in card and "PeftModel" not in card and "--merged" not in card
            with pytest.raises(ValueError, match="CuMA mixture"):
                export_merged(run_dir, run_dir / "merged", adapter=folder.name)
            continue
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "fedlora:tiny"
        assert str(cache_dir()) not in json.dumps(config)
        card = (folder / "README.md").read_text()
        header = yaml.safe_load(card.split("---")[1])
        assert header["library_name"] == "peft" and header["base_model"] == "fedlora:tiny"
        assert f"**{method.name}**" in card and f"for {summary['rounds']} round(s)" in card
        assert "3 clients" in card and "benign, malignant" in card and "`diagnosis`" in card
        assert f"{summary['clients']['accuracy']['mean']:.3f}" in card
        assert "r = 4, alpha = 8.0" in card and "PeftModel.from_pretrained" in card
        leaked = values & set(re.findall(r"\d+\.\d+", card))  # whole numbers only ('2403.12313' is an arXiv id)
        assert not leaked, f"data values leaked into the card: {sorted(leaked)[:3]}"


@pytest.mark.parametrize("method", ["fedit", "flora", "fedtree"])
def test_auto_peft_loads_when_the_base_is_a_local_folder(fed, tmp_path, method):
    base_dir = tmp_path / "base"
    model, tok = build_tiny_model(0)
    model.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    extra = CASES["fedtree"] if method == "fedtree" else []
    cfg = make_config(*FAST, f"fl.method={method}", f"model.name={base_dir}", *extra)
    f = dataclasses.replace(fed, cfg=cfg)  # the same weights as the folder, already loaded
    result = run_method(f, method, tmp_path / "run", quiet=True)
    m = build_method(method, method_options(cfg, method))
    folder = _folders(tmp_path / "run")[0]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ids = _ids(fed)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    got = _logits(loaded, ids)
    if method != "flora":  # FLoRA's SVD at rank r is inexact (error stated, tested above)
        torch.testing.assert_close(got, _fedlora_logits(f, m, result.state, folder.name, ids), atol=ATOL, rtol=0)
    assert "AutoPeftModelForCausalLM" in (folder / "README.md").read_text()


@pytest.mark.parametrize("case,adapter", [("fedit", "global"), ("flora", "global"), ("fedtree", "client_1")])
def test_export_merged_round_trip(saved, fed, tmp_path, case, adapter):
    """`fedlora export --merged`: plain transformers loads it and gives fedlora's logits (FLoRA: exact delta)."""
    run_dir, f, method, state = saved(case)
    out = tmp_path / "merged"
    assert main(["--quiet", "export", str(run_dir), "--merged", str(out), "--adapter", adapter]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = _ids(fed)
    assert torch.equal(tok("mean radius is 17.99. mean texture is 10.38. Answer: malignant",
                           return_tensors="pt")["input_ids"], ids)
    torch.testing.assert_close(_logits(model, ids), _fedlora_logits(f, method, state, adapter, ids),
                               atol=MERGED_ATOL, rtol=0)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card


def test_export_refuses_a_missing_adapter_and_a_full_folder(saved, tmp_path, capsys):
    run_dir = saved("fedit")[0]
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "a"), "--adapter", "client_0"]) == 2
    assert "it has global" in capsys.readouterr().err
    compare_dir = tmp_path / "compare"  # a compare directory: one run per method and seed
    for case in ("fedit", "flora"):
        shutil.copytree(saved(case)[0] / "adapters", compare_dir / f"{case}-seed0" / "adapters")
    with pytest.raises(ValueError, match="fedit-seed0, .*flora-seed0"):
        export_merged(compare_dir, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_merged(run_dir, tmp_path / "full")
