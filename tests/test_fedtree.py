"""FedTreeLoRA: the mixing layer's known answer, the one-cluster limit (= FedIT), mixing runs."""

from __future__ import annotations

import json

import torch

from conftest import assert_same_tensors, base_snapshot, make_config, wrapped_tiny
from fedlora import run
from fedlora.fl.engine import Simulator
from fedlora.fl.methods import build_method
from fedlora.model.lora import adapter_parameters, adapter_state, lora_layers
from fedlora.model.mixing import attach_mixing, detach_mixing


def test_mixing_layer_matches_the_formula():
    model, _ = wrapped_tiny(seed=3)
    attach_mixing(model, [1], logit_init=0.7)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if not name.endswith("mix_logit"):
                p.copy_(torch.randn(p.shape, generator=gen))
    layer = lora_layers(model)["model.layers.1.self_attn.q_proj"]
    x = torch.randn(3, layer.in_features, generator=gen)
    lam = torch.sigmoid(torch.tensor(0.7))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ea, eb = layer.mix_ext_A, layer.mix_ext_B
    s = layer.scaling["default"]
    expected = layer.get_base_layer()(x) + s * (lam * (x @ a.T @ b.T) + (1 - lam) * (x @ ea.T @ eb.T))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # Layer 0 is not mixed: plain LoRA.
    plain = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    a0, b0 = plain.lora_A["default"].weight, plain.lora_B["default"].weight
    torch.testing.assert_close(plain(x), plain.get_base_layer()(x) + s * (x @ a0.T @ b0.T), atol=1e-5, rtol=1e-5)
    state = adapter_state(model)
    assert "model.layers.1.mix_logit" in state and "model.layers.1.self_attn.q_proj.mix_ext_A" in state
    detach_mixing(model)
    assert not any("mix_" in k for k in adapter_state(model))


def test_gradient_reaches_lambda_and_not_the_external_expert():
    model, _ = wrapped_tiny(seed=1)
    attach_mixing(model, [0, 1])
    from fedlora.model.lora import set_trainable

    params = set_trainable(model, "abm")
    names = {id(p): n for n, p in adapter_parameters(model).items()}
    trained = {names[id(p)] for p in params}
    assert "model.layers.0.mix_logit" in trained
    assert not any("mix_ext" in n for n in trained)
    with torch.no_grad():
        for n, p in adapter_parameters(model).items():
            if "mix_ext" in n or n.endswith("lora_B"):
                p.normal_()
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum()
    out.backward()
    logit = adapter_parameters(model)["model.layers.0.mix_logit"]
    assert logit.grad is not None and logit.grad.abs() > 0
    detach_mixing(model)


def test_one_cluster_everywhere_is_fedit_exactly(fed):
    """tau >= 1 keeps one cluster at every layer: the same tensors as FedIT for the same seed."""
    fedit = Simulator(fed, "fedit", seed=4).run()
    tree = Simulator(fed, build_method("fedtree", {"tau": 10.0}), seed=4).run()
    method = build_method("fedtree", {"tau": 10.0})
    assert method.mixing_layers(tree.state.server) == []
    global_state = fedit.state.server
    for client in tree.state.clients:
        personal = method.personal_adapter(tree.state.server, client)
        assert set(personal) == set(global_state)
        assert all(torch.equal(personal[k], global_state[k]) for k in global_state)
    scores = lambda rows: [(r["client"], r["accuracy"]) for r in rows if isinstance(r["client"], int) and "accuracy" in r]
    assert scores(tree.rows) == scores(fedit.rows)


def test_mixing_run_trains_lambdas_and_leaves_the_model_clean(fed):
    before = base_snapshot(fed.model)
    method = build_method("fedtree", {"tau": -1.0, "fixed_clusters": 2, "mode": "fixed"})
    result = Simulator(fed, method, seed=0).run()
    server = result.state.server
    assert method.mixing_layers(server) == [0, 1]
    lambdas = [v for c in result.state.clients for k, v in c.items() if k.endswith("mix_logit")]
    assert lambdas and any(float(v) != 0.0 for v in lambdas)  # trained away from lambda_init = 0.5
    down = method.download(server, 0)
    assert any(k.endswith("mix_ext_A") for k in down)
    up, _ = method.upload(method.personal_adapter(server, result.state.clients[0]), result.state.clients[0])
    assert all(k.endswith(("lora_A", "lora_B")) for k in up)  # lambda never leaves the client
    assert_same_tensors(before, base_snapshot(fed.model))
    assert not any("mix_" in k for k in adapter_state(fed.model))  # detached after the run


def test_run_writes_tree_and_picture(tmp_path):
    cfg = make_config("fl.method=fedtree", "fl.rounds=2", "fl.method_args={tau: -1.0}",
                      output_dir=tmp_path)
    out = run(cfg, quiet=True)
    tree = json.loads((out / "client_tree.json").read_text())
    assert len(tree["labels"]) == 2 and len(tree["labels"][0]) == 3
    assert (out / "client_tree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapters" / "client_0" / "adapter_config.json").exists()
