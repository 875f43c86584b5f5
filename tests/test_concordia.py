"""Concordia (fl/concordia.py, synth/generator.py, synth/grpo.py) on the tiny model.

The plain tiny random Llama cannot learn the GReaT format with LoRA (its logits are capped near
+-1.3), so the orchestration tests on the shared tiny federation replace only the generator's
*sampling* by a draw of the client's own real rows with jittered numbers (`_jittered_rows`);
fitting, GRPO, the scorers, the reweighting, the server method and every payload run for real.
The shipped `concordia_tiny` config (the learnable 'tiny-lm') runs everything with real
generation, and `tests/test_slow_smollm2.py` runs it on the embedded model.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import make_config
from fedlora.fl.concordia import ENSEMBLE, SCORER, ConcordiaSimulator
from fedlora.fl.engine import Simulator
from fedlora.model.lora import adapter_state
from fedlora.synth.generator import SampleResult, TableGenerator

FAST = ("concordia.enabled=true", "concordia.synthetic_rows=12", "concordia.generator={steps: 2, max_new_tokens: 8}",
        "concordia.grpo={prompts_per_step: 1, group_size: 2, steps: 1, max_new_tokens: 8}",
        "concordia.scorer={epochs: 20, subset: 8}",
        "fl.rounds=2", "train.local_steps=2", "fl.eval_every=0")


# --- the Concordia round, with real rows standing in for the LLM's samples ---------------------------


def _jittered_rows(self, model, tokenizer, n, rng, temperature=None, max_new_tokens=None):
    """Test double of TableGenerator.sample: n of the client's real rows, numbers jittered 2 %."""
    spec = self.codec.spec
    names = self.codec.names
    texts = []
    for _ in range(n):
        lo_hi = spec["ranges"]
        row = {}
        for name in names:
            if name in lo_hi:
                lo, hi = lo_hi[name]
                row[name] = float(rng.uniform(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)))
            else:
                texts_counts = spec["marginals"][name]
                row[name] = texts_counts[int(rng.integers(len(texts_counts)))][0]
        texts.append(", ".join(f"{self.codec._text[k]} is {self.codec._format(k, v) if k in lo_hi else v}"
                               for k, v in row.items()))
    parsed = [self.codec.parse(t) for t in texts]
    return SampleResult(self.codec.to_frame([r for r, _ in parsed if r is not None]), texts, [x for _, x in parsed])


@pytest.fixture
def fake_sampler(monkeypatch):
    monkeypatch.setattr(TableGenerator, "sample", _jittered_rows)


def _concordia(fed, *overrides):
    return dataclasses.replace(fed, cfg=make_config(*FAST, *overrides))


def test_only_task_lora_and_scorer_tensors_leave_a_client(fed, fake_sampler, monkeypatch):
    """The audit: every upload holds the task adapter's tensors and the scorer's, nothing else;
    no uploaded tensor equals a generator tensor; rows and validation data are never tensors sent."""
    sent = []
    original = Simulator.receive

    def spy(self, cid, payload, *args, **kwargs):
        sent.append((cid, dict(payload)))
        return original(self, cid, payload, *args, **kwargs)

    monkeypatch.setattr(Simulator, "receive", spy)
    sim = ConcordiaSimulator(_concordia(fed), "fedit")
    result = sim.run()
    adapter = set(adapter_state(fed.model))
    generators = result.state.synthetic["generator"]
    assert len(sent) == 2 * fed.num_clients
    for cid, payload in sent:
        task = {k for k in payload if not k.startswith(SCORER)}
        scorer = {k for k in payload if k.startswith(SCORER)}
        assert task == adapter and scorer, f"client {cid} sent {sorted(payload)[:4]}..."
        for k in task:  # the task LoRA trained on synthetic rows, never the generator's weights
            assert not torch.equal(payload[k], generators[cid]["adapter." + k])
    # the server redistributes the scorers, and only those, beside the method's download
    assert set(result.state.synthetic["ensemble"]) == {str(c) for c in range(fed.num_clients)}
    down = sim.rule.download_extra(result.state)
    assert down and all(k.startswith(ENSEMBLE) for k in down)


def test_rows_are_reweighted_by_the_scorer_from_round_two(fed, fake_sampler):
    sim = ConcordiaSimulator(_concordia(fed), "fedit")
    state = sim.initial_state()
    sim.run_round(state)
    assert all(w is None for w in sim.rule.weights)  # round 1: no scorer yet, uniform
    sim.run_round(state)
    weights = [w for w in sim.rule.weights if w is not None]
    assert len(weights) == fed.num_clients
    assert all(np.isclose(w.mean(), 1.0) and w.std() > 0 for w in weights)


@pytest.mark.parametrize("variant,reweights,shares", [("uniform", False, True), ("local", True, False),
                                                      ("static", False, False), ("decoupled", False, False)])
def test_baseline_variants(fed, fake_sampler, variant, reweights, shares):
    sim = ConcordiaSimulator(_concordia(fed, f"concordia.variant={variant}"), "fedit")
    result = sim.run()
    assert any(w is not None for w in sim.rule.weights) == reweights
    assert bool(result.state.synthetic["ensemble"]) == shares
    assert any("grpo_reward" in r for r in result.rows) == (variant not in ("static", "decoupled"))
    kept = result.state.synthetic["rows"]
    assert all(r is not None for r in kept) == (variant == "static")


def test_same_seed_same_metrics(fed, fake_sampler):
    def rows():
        out = ConcordiaSimulator(_concordia(fed), "fedit").run().rows
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in out]

    assert rows() == rows()


def test_quality_is_reported_per_client_and_round(fed, fake_sampler, tmp_path):
    sim = ConcordiaSimulator(_concordia(fed), "fedit")
    result = sim.run()
    quality = [r for r in result.rows if isinstance(r["client"], int) and "syn_fidelity_mean" in r]
    assert len(quality) == 2 * fed.num_clients
    assert all(0 <= r["syn_mia_auc"] <= 1 and r["syn_validity"] == 1.0 for r in quality)
    files = sim.save_extras(result, tmp_path)
    assert (tmp_path / "quality.jsonl").read_text().count("\n") == 2 * fed.num_clients
    assert any(p.suffix == ".png" for p in files)


def test_generator_without_valid_rows_fails_the_client_clearly(fed, monkeypatch):
    monkeypatch.setattr(TableGenerator, "sample",
                        lambda self, *a, **k: SampleResult(self.codec.to_frame([]), ["x is"], ["malformed"]))
    sim = ConcordiaSimulator(_concordia(fed, "fl.rounds=1"), "fedit")
    rows = sim.run().rows
    errors = [r["error"] for r in rows if isinstance(r["client"], int) and r.get("failed")]
    assert len(errors) == fed.num_clients and "wrote no valid row" in errors[0]


def test_fedlora_concordia_compares_variants_on_one_partition(fed, fake_sampler, tmp_path):
    """`fedlora concordia`: real-data FedIT and two variants, same partition, one table each."""
    from fedlora.concordia import compare_variants

    cfg = make_config(*FAST, "data.shift_column=mean radius", output_dir=tmp_path)
    out = compare_variants(cfg, ["real", "concordia", "static"], quiet=True)
    table = (out / "comparison.md").read_text()
    assert all(f"| {label}:fedit | global |" in table for label in ("real", "concordia", "static"))
    extra = (out / "concordia.md").read_text()
    assert "| concordia:fedit |" in extra and "| real:fedit |" in extra
    assert (out / "concordia:fedit-seed0" / "quality.jsonl").exists()
    real_rows = (out / "real:fedit-seed0" / "metrics.jsonl").read_text()
    assert '"client": "shifted"' in real_rows and "syn_rows" not in real_rows
    with pytest.raises(ValueError, match="unknown Concordia variant"):
        compare_variants(cfg, ["bogus"], quiet=True)


@pytest.mark.parametrize("method", ["flora", "fedtree", "dec_lora", "centralized"])
def test_methods_that_cannot_carry_concordia_are_refused(fed, method):
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="concordia cannot federate"):
        ConcordiaSimulator(_concordia(fed), method)


def test_variants_reuse_the_same_fitted_generators(fed, fake_sampler, monkeypatch):
    """The fit is deterministic given (model, seed, client rows, config): a second simulator on
    the same federation gets bitwise the same generators without fitting again."""
    first = ConcordiaSimulator(_concordia(fed), "fedit").initial_state().synthetic["generator"]
    monkeypatch.setattr(TableGenerator, "fit", lambda *a, **k: pytest.fail("fitted again"))
    again = ConcordiaSimulator(_concordia(fed, "concordia.variant=static"), "fedit").initial_state()
    for a, b in zip(first, again.synthetic["generator"]):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_concordia_tiny_config_runs_end_to_end_with_real_generation(tmp_path):
    """The shipped tiny configuration, no test double: each client's generator (the tiny LM plus
    its LoRA) is fitted, writes rows that parse, and the task LoRA trains on them."""
    from fedlora import load_config, run

    cfg = load_config(_shipped("concordia_tiny"), ["fl.rounds=1", f"output_dir={tmp_path}"])
    out = run(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if isinstance(r["client"], int)]
    assert len(clients) == 3 and not any(r.get("failed") for r in clients)
    assert all(r["syn_rows"] >= 1 and 0 < r["syn_validity"] <= 1 for r in clients)
    assert all(math.isfinite(r["grpo_reward"]) and math.isfinite(r["train_loss"]) for r in clients)
    assert [r for r in rows if r["client"] == "shifted"]
    assert (out / "quality.jsonl").read_text().count("\n") == 3 and (out / "quality.png").exists()


def _shipped(name):
    from fedlora.cli import shipped_configs

    return shipped_configs()[name]
