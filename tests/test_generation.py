"""Generation tasks (data.task=generation): records, encoding, masks, truncation, metrics, end to end.

Tiny model only. Hand-computed values: the loss mask of two collated examples, ROUGE on fixed
strings, the truncation of known token lists; HF's own causal-LM loss (labels -100 on the
prompt) is the reference for our response-only loss and perplexity.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.config import ConfigError, DataConfig, load_config
from fedlora.config.validate import validate
from fedlora.data import DataError, load_table
from fedlora.data.generation import read_records
from fedlora.model.tiny import build_tiny_model
from fedlora.train.batches import collate, target_logprobs
from fedlora.train.gen_encode import (
    MIN_PROMPT_TOKENS,
    GenerationExamples,
    bucket_by_length,
    causal_lm_labels,
    encode_generation,
    end_marker,
    fit,
    padding_fraction,
    render,
    stop_tokens,
)
from fedlora.train.gen_eval import (
    exact_match,
    greedy_generate,
    normalize,
    perplexity,
    rouge,
    text_metrics,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEN = DataConfig(task="generation")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "generation_tiny.yaml"


def _jsonl(path, records) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return str(path)


def _records(n: int = 30) -> list[dict]:
    colours = ["red", "green", "blue"]
    return [{"prompt": f"What colour is item {i}?", "response": f"item {i} is {colours[i % 3]}",
             "task": "colour" if i % 2 else "item"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(0)


# --- records and bad input ----------------------------------------------------------------------

def test_records_prompt_system_and_chat_forms(tmp_path):
    path = tmp_path / "r.jsonl"
    _jsonl(path, [{"prompt": "Q1", "response": "A1", "system": "Be brief.", "task": "x"},
                  {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}])
    frame = read_records(path, GEN)
    assert frame["_chat"][0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    assert frame["_chat"][1][-1] == {"role": "user", "content": "Q2"} and len(frame["_chat"][1]) == 3
    assert frame["response"].tolist() == ["A1", "A2"] and frame["_line"].tolist() == [1, 2]


def test_configurable_field_names_and_csv(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('instruction,output\n"Say, hi","hi there"\nQ2,"two\nlines"\nQ3,A3\n', encoding="utf-8")
    cfg = replace(GEN, prompt_field="instruction", response_field="output")
    frame = read_records(path, cfg)
    assert frame["prompt"].tolist() == ["Say, hi", "Q2", "Q3"]
    assert frame["_line"].tolist() == [2, 3, 5]  # the quoted cell spans lines 3-4


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], r"line 2: no \"response\" field.*data.response_field"),
    (['{"prompt": "a", "response": "b"}', "{not json"], "line 2: not valid JSON"),
    (['["a", "b"]'], "line 1: a JSON list, not an object"),
    (['{"prompt": 3, "response": "b"}'], 'line 1: "prompt" must be text'),
    (['{"prompt": "  ", "response": "b"}'], 'line 1: "prompt" is empty'),
    (['{"messages": [{"role": "user", "content": "q"}]}'], "line 1: the last message .* assistant"),
    (['{"messages": [{"role": "robot", "content": "q"}]}'], "line 1: \"messages\" must be a list"),
])
def test_bad_records_name_the_line(tmp_path, lines, message):
    _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / "bad.jsonl", GEN)


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8 \(byte 0xe9.*re-save the file as UTF-8"):
        read_records(path, GEN)


def test_empty_responses_are_dropped_with_a_counted_warning(tmp_path):
    _jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": " "},
                                  {"prompt": "d", "response": ""}])
    with pytest.warns(UserWarning, match=r"dropped 2 record\(s\) with an empty response \(line 2, 3\)"):
        frame = read_records(tmp_path / "r.jsonl", GEN)
    assert frame["response"].tolist() == ["b"]


def test_task_config_refusals():
    cfg = load_config(CONFIG)
    validate(cfg)
    with pytest.raises(ConfigError, match="robust.label_flip does not apply to data.task=generation"):
        validate(replace(cfg, robust=replace(cfg.robust, label_flip=True, byzantine=1)))
    with pytest.raises(ConfigError, match="did you mean generation"):
        validate(replace(cfg, data=replace(cfg.data, task="generatoin")))
    with pytest.raises(DataError, match="is a classification table"):
        load_table(DataConfig(source="german-credit", task="generation"))


def test_derived_task_has_exact_references():
    table = load_table(DataConfig(source="german-credit-qa", task="generation"))
    assert table.kind == "generation" and table.classes == ["extract", "lookup", "summary"]
    first = table.frame.iloc[0]  # record 0: a lookup of 'purpose'
    assert first["task"] == "lookup" and first["response"] == "radio/television"
    assert first["prompt"].endswith("What is the purpose? Answer with the value only.")
    assert table.frame.iloc[1]["response"] == "A 22-year-old applicant asks for 5951 DM over 48 months for radio/television."


# --- serialization, masks, truncation ------------------------------------------------------------

def test_plain_serialization(tiny):
    _, tok = tiny
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render(tok, chat, "yes", False) == ("<|bos|>System: S\nUser: Q\nAssistant:", " yes<|endoftext|>")
    frame = pd.DataFrame({"_chat": [chat], "prompt": ["Q"], "response": ["yes"], "_line": [1]})
    ex = encode_generation(tok, frame, 64)
    assert ex.prompt_ids[0][0] == tok.bos_token_id and ex.response_ids[0][-1] == tok.eos_token_id
    assert ex.stop_ids == [tok.eos_token_id]


def test_chat_template_serialization(tiny):
    _, base = tiny
    from fedlora.model.tiny import _tiny_tokenizer

    tok = _tiny_tokenizer()  # a fresh one: the fixture's tokenizer keeps no template
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt, response = render(tok, chat, "yes", True)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert response == "yes<|im_end|>" and end_marker(tok) == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_tokens(tok, True) == [tok.eos_token_id, im_end]
    frame = pd.DataFrame({"_chat": [chat], "prompt": ["Q"], "response": ["yes"], "_line": [1]})
    ex = encode_generation(tok, frame, 64, style="auto")
    assert ex.response_ids[0][-1] == im_end and ex.prompt_ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ex.prompt_ids[0] + ex.response_ids[0]) == prompt + response
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_generation(base, frame, 64, style="chat")


def test_response_only_loss_mask_at_hand_computed_positions():
    examples = GenerationExamples([[5, 6, 7], [5, 6]], [[8, 9], [8, 9, 10]], ["a", "b"])
    batch = collate([examples.pair(0), examples.pair(1)], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 8, 9, 10]]
    assert batch["targets"].tolist() == [[-100, 8, 9], [8, 9, 10]]
    assert causal_lm_labels(batch).tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 8, 9, 10]]


def test_response_loss_and_perplexity_match_hf_causal_lm_loss(tiny):
    model, _ = tiny
    examples = GenerationExamples([[1, 40, 41, 42, 43]], [[50, 51, 52, 0]], ["x"])
    batch = collate([examples.pair(0)], pad_id=2, device=torch.device("cpu"))
    with torch.no_grad():
        logp, count = target_logprobs(model, batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=causal_lm_labels(batch)).loss
    assert int(count) == 4
    assert float(-logp / count) == pytest.approx(float(hf), rel=1e-5)
    assert perplexity(model, examples, pad_id=2) == pytest.approx(math.exp(float(hf)), rel=1e-5)


def test_truncation_never_cuts_the_response_start():
    prompt, response = list(range(100)), list(range(1000, 1010))
    p, r, cut = fit(prompt, response, 40, "record on line 7")
    assert r == response and p == prompt[-30:] and cut == "prompt"
    p, r, cut = fit(prompt, list(range(1000, 1035)), 40, "record on line 7")
    assert r == list(range(1000, 1000 + 40 - MIN_PROMPT_TOKENS)) and p == prompt[-MIN_PROMPT_TOKENS:]
    assert cut == "response"
    rng = np.random.default_rng(0)
    for _ in range(200):  # any lengths: the response keeps its start, the prompt its end, the cap holds
        n_p, n_r, cap = int(rng.integers(1, 80)), int(rng.integers(1, 60)), int(rng.integers(20, 90))
        if n_r > cap:
            continue
        p, r, _ = fit(list(range(n_p)), list(range(500, 500 + n_r)), cap, "x")
        assert r == list(range(500, 500 + len(r))) and p == list(range(n_p - len(p), n_p))
        assert len(p) + len(r) <= cap and len(p) >= min(n_p, MIN_PROMPT_TOKENS, cap - len(r))
    with pytest.raises(DataError, match=r"record on line 7: the response is 41 tokens, longer than data.max_length=40"):
        fit(prompt, list(range(41)), 40, "record on line 7")


def test_encoding_counts_cut_prompts(tiny):
    _, tok = tiny
    chat = [{"role": "user", "content": "the value of the row " * 30}]
    frame = pd.DataFrame({"_chat": [chat, chat], "prompt": ["q", "q"], "response": ["yes", "no"], "_line": [4, 9]})
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) cut from the left .* \(line 4, 9\)"):
        ex = encode_generation(tok, frame, 32, name="client 0 train")
    assert all(len(p) + len(r) <= 32 for p, r in zip(ex.prompt_ids, ex.response_ids))
    assert ex.response_ids[0][-1] == tok.eos_token_id


def test_length_bucketing_keeps_rows_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=64)
    batches = [np.asarray(b) for b in np.split(rng.permutation(64), 16)]
    bucketed = bucket_by_length(batches, lengths, np.random.default_rng(1))
    assert [len(b) for b in bucketed] == [4] * 16
    for w in range(0, 16, 8):  # each window holds the same rows as before
        assert sorted(np.concatenate(bucketed[w:w + 8])) == sorted(np.concatenate(batches[w:w + 8]))
    assert padding_fraction(bucketed, lengths) < 0.5 * padding_fraction(batches, lengths)
    again = bucket_by_length(batches, lengths, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(bucketed, again))


# --- metrics -----------------------------------------------------------------------------------

def test_rouge_and_exact_match_hand_computed():
    s = rouge("the cat sat on the mat", "the cat is on the mat")
    # unigrams: the x2, cat, on, mat overlap = 5 of 6 each way; bigrams: the-cat, on-the, the-mat = 3 of 5;
    # LCS: the cat on the mat = 5 of 6.
    assert s == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    s = rouge("red fox", "red fox jumps high")  # P = 1, R = 1/2 -> F = 2/3; bigrams P = 1, R = 1/3 -> F = 1/2
    assert s == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    assert rouge("blue", "green") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert normalize("  Own.\t Car ") == "own. car"
    assert exact_match("  OWN. ", "own.") == 1.0 and exact_match("own", "own.") == 0.0
    assert exact_match("A  b\nc", "a b c") == 1.0
    m = text_metrics(["red fox", "blue"], ["red fox jumps high", "Blue"])
    assert m == pytest.approx({"rouge1": (2 / 3 + 1) / 2, "rouge2": (1 / 2 + 0) / 2, "rougeL": (2 / 3 + 1) / 2,
                               "exact_match": 0.5})


def test_greedy_generation_is_deterministic_and_stops(tiny):
    model, tok = tiny
    ex = GenerationExamples([[1, 40, 41], [1, 40, 41, 42, 43, 44]], [[5], [6]], ["a", "b"],
                            stop_ids=[tok.eos_token_id])
    first = greedy_generate(model, ex, tok.pad_token_id, max_new_tokens=7)
    assert first == greedy_generate(model, ex, tok.pad_token_id, max_new_tokens=7)
    assert all(len(g) <= 7 and tok.eos_token_id not in g for g in first)
    alone = GenerationExamples([ex.prompt_ids[0]], [[5]], ["a"], stop_ids=ex.stop_ids)
    assert greedy_generate(model, alone, tok.pad_token_id, max_new_tokens=7)[0] == first[0]  # padding-free


# --- end to end ----------------------------------------------------------------------------------

def _tiny_generation_cfg(tmp_path, source: str, **fl):
    cfg = load_config(CONFIG)
    return replace(cfg, output_dir=str(tmp_path / "runs"), data=replace(cfg.data, source=source, max_rows=None),
                   partition=replace(cfg.partition, min_rows=5), fl=replace(cfg.fl, **fl))


def _metric_rows(path):
    keep = ("client", "round", "method", "rougeL", "rouge1", "rouge2", "exact_match", "perplexity", "train_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines())]


def test_fedit_run_end_to_end_writes_metrics_and_samples(tmp_path):
    from fedlora.experiment import run

    source = _jsonl(tmp_path / "qa.jsonl", _records(60))
    cfg = _tiny_generation_cfg(tmp_path, source)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(cut|dropped)")  # nothing is cut or dropped here
        run_dir = run(cfg, quiet=True)
    rows = _metric_rows(run_dir / "metrics.jsonl")
    scored = [r for r in rows if "rougeL" in r and r["round"] == 2]
    assert {r["client"] for r in scored} == {0, 1, 2, "global"}
    for r in scored:
        assert 0 <= r["rougeL"] <= 1 and 0 <= r["exact_match"] <= 1 and r["perplexity"] > 1
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * cfg.eval.samples
    assert {s["set"] for s in samples} == {"client 0 test", "client 1 test", "client 2 test", "global test"}
    assert all(s["method"] == "fedit" and s["round"] == 2 and "generation" in s for s in samples)
    # The untrained model's answers on the same prompts, beside the trained ones.
    untrained = [json.loads(x) for x in (run_dir / "zero-shot-samples.jsonl").read_text().splitlines()]
    assert sorted((s["set"], s["prompt"], s["reference"]) for s in untrained) == sorted(
        (s["set"], s["prompt"], s["reference"]) for s in samples)
    assert all(s["method"] == "zero-shot" and s["round"] == 0 and s["seed"] == cfg.seed for s in untrained)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "rougeL" in summary["clients"] and "accuracy" not in summary["clients"]
    table = (run_dir / "comparison.md").read_text()
    assert "zero-shot" in table and "baseline" not in table and "client ROUGE-L" in table
    card = (run_dir / "adapters" / "global" / "README.md").read_text()
    assert "| rougeL |" in card and "greedy answers" in card and "classes:" not in card and "| accuracy |" not in card
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "client ROUGE-L" in page and "sample answers" in page and "zero-shot (untrained model)" in page
    # Same config, same seed: the same scores and the same answers.
    again = run(replace(cfg, run_name=None), quiet=True)
    assert _metric_rows(again / "metrics.jsonl") == rows
    assert (again / "samples.jsonl").read_text() == (run_dir / "samples.jsonl").read_text()


@pytest.mark.parametrize("method", ["local", "centralized"])
def test_local_and_centralized_run_on_generation(tmp_path, method):
    from fedlora.fl.engine import Simulator
    from fedlora.fl.federation import prepare

    cfg = _tiny_generation_cfg(tmp_path, _jsonl(tmp_path / "qa.jsonl", _records(60)), rounds=1, method=method)
    fed = prepare(cfg)
    sim = Simulator(fed, method)
    rows = sim.run().rows
    trained = [r for r in rows if "train_loss" in r]
    assert trained and all(np.isfinite(r["train_loss"]) for r in trained)
    scored = {r["client"] for r in rows if "rougeL" in r}
    assert scored == ({0, 1, 2} if method == "local" else {0, 1, 2, "global"})
    assert sim.samples and all("reference" in s for s in sim.samples)


# --- every method on a generation task ----------------------------------------------------------

@pytest.fixture(scope="module")
def gen_fed(tmp_path_factory):
    from fedlora.fl.federation import prepare

    tmp = tmp_path_factory.mktemp("gen")
    return prepare(_tiny_generation_cfg(tmp, _jsonl(tmp / "qa.jsonl", _records(60)), rounds=1))


REFUSED_ON_GENERATION = {"cuma"}  # its profile lookup keys classification prompts (docs/cuma.md)


@pytest.mark.parametrize("method", sorted(__import__("fedlora").available_methods()))
def test_every_method_trains_and_scores_a_generation_task(gen_fed, tmp_path, method):
    """What a method trains and sends is independent of the task: every method runs a round on
    free-form answers and every client is scored by ROUGE; methods that cannot are refused up front."""
    from fedlora.experiment import run_method

    fed = replace(gen_fed, cfg=replace(gen_fed.cfg, fl=replace(gen_fed.cfg.fl, method=method)))
    if method in REFUSED_ON_GENERATION:
        with pytest.raises(ConfigError, match="generation"):
            run_method(fed, method, tmp_path, quiet=True)
        return
    result = run_method(fed, method, tmp_path, quiet=True)
    trained = [r for r in result.rows if "train_loss" in r]
    assert trained and all(np.isfinite(r["train_loss"]) for r in trained)
    scored = [r for r in result.rows if "rougeL" in r and r["client"] in (0, 1, 2)]
    assert {r["client"] for r in scored} == {0, 1, 2}
    assert all(0 <= r["rougeL"] <= 1 and r["perplexity"] > 1 and "accuracy" not in r for r in scored)
    assert (tmp_path / "samples.jsonl").is_file()
