"""End to end on the real embedded model: one short FedIT round must train and score for real."""

import math

import pytest
import torch

from fedlora import Simulator, load_config, prepare
from fedlora.model import adapter_parameters

pytestmark = pytest.mark.slow


def test_fedit_round_on_smollm2_trains_adapters_and_scores(tmp_path):
    cfg = load_config("configs/demo.yaml", [
        f"output_dir={tmp_path}", "partition.num_clients=2", "partition.scheme=iid",
        "data.max_rows=120", "train.local_steps=2", "train.batch_size=4", "fl.rounds=1",
        "eval.max_examples=6", "data.number_format=quantile",
    ])
    fed = prepare(cfg)
    # The chat template wraps the row: the assistant turn starts with "Answer:".
    text = fed.tokenizer.decode(fed.clients[0].train.prompt_ids[0])
    assert "<|im_start|>assistant\nAnswer:" in text
    base = {n: p.detach().clone() for n, p in fed.model.named_parameters() if "lora_" not in n}
    result = Simulator(fed, "fedit").run()
    server = result.state.server
    assert all(server[k].abs().sum() > 0 for k in server if k.endswith("lora_B"))
    for name, p in fed.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    clients = [r for r in result.rows if isinstance(r["client"], int)]
    assert len(clients) == 2 and all(math.isfinite(r["train_loss"]) for r in clients)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in clients)
    assert len(adapter_parameters(fed.model)) == 2 * 2 * 30  # q,v x A,B x 30 layers


def test_concordia_round_on_smollm2_generates_valid_rows_and_trains_on_them(tmp_path):
    """The real pipeline: GReaT fit of each client's generator, sampling and strict parsing,
    task training on synthetic rows only, influence targets, scorer fit, one GRPO step."""
    from fedlora.fl.concordia import SCORER, ConcordiaSimulator

    cfg = load_config("configs/demo.yaml", [
        f"output_dir={tmp_path}", "partition.num_clients=2", "partition.scheme=iid", "data.max_rows=160",
        "data.columns=[mean radius, mean texture, mean area]", "train.local_steps=1", "train.batch_size=4",
        "fl.rounds=1", "eval.max_examples=4", "concordia.enabled=true", "concordia.synthetic_rows=24",
        "concordia.generator={steps: 30, lr: 0.003, batch_size: 4}",
        "concordia.grpo={group_size: 2, prompts_per_step: 1, steps: 1}", "concordia.scorer={subset: 8, epochs: 50}",
    ])
    fed = prepare(cfg)
    result = ConcordiaSimulator(fed, "fedit").run()
    clients = [r for r in result.rows if isinstance(r["client"], int)]
    assert len(clients) == 2 and not any(r.get("failed") for r in clients), clients
    assert all(r["syn_validity"] > 0 and r["syn_rows"] >= 1 for r in clients)
    assert all(math.isfinite(r["grpo_reward"]) and math.isfinite(r["scorer_loss"]) for r in clients)
    assert set(result.state.synthetic["ensemble"]) == {"0", "1"}
    assert not any(k.startswith(SCORER) for k in result.state.server)
