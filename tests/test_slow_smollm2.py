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
