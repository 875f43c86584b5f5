"""Evaluation of free-form answers: greedy generation, ROUGE-1/2/L, exact match, perplexity.

Decoding is fixed so scores are comparable across methods, rounds and seeds: greedy (no
sampling, one beam), at most `eval.max_new_tokens` new tokens, stopping at EOS or the chat
template's end-of-turn token; the model's own generation defaults are not consulted. It runs
under `torch.inference_mode()` and `compute_context(model)` (bf16 autocast where the model's
precision says so), as every other fedlora forward does.

Metrics of one set (`generation_metrics`), each in [0, 1] except perplexity:
- rouge1, rouge2, rougeL: the mean over examples of the F-measure of Google's `rouge-score`
  (its tokenizer lowercases and keeps only [a-z0-9] runs; Porter stemming on), between the
  generated answer and the reference;
- exact_match: the share of answers equal to the reference after `normalize` (Unicode NFKC,
  case folded, every whitespace run one space, ends stripped; punctuation is kept, so "own." is
  not "own");
- perplexity: exp of the mean negative log-likelihood per reference token (response tokens
  including the end marker), pooled over the set's tokens rather than averaged per example, so
  long references weigh by their length.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import torch

from fedlora.model.precision import compute_context
from fedlora.train.batches import collate, target_logprobs
from fedlora.train.gen_encode import GenerationExamples

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
GENERATION_METRICS = (*ROUGE_TYPES, "exact_match", "perplexity")


def normalize(text: str) -> str:
    """The form exact match compares: NFKC, case folded, whitespace runs collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


_SCORER = None


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """{rouge1, rouge2, rougeL}: F-measures of `rouge_score` with stemming (one scorer per process)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer, tokenizers

        # The library's default tokenizer, passed explicitly (it logs a line when it picks it itself).
        _SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True,
                                           tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    scores = _SCORER.score(reference, prediction)  # (target, prediction): the library's order
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures and exact match of `predictions` against `references` (NaN when empty)."""
    if not predictions:
        return {**{k: float("nan") for k in ROUGE_TYPES}, "exact_match": float("nan")}
    per = [rouge(p, r) for p, r in zip(predictions, references)]
    out = {k: float(np.mean([s[k] for s in per])) for k in ROUGE_TYPES}
    out["exact_match"] = float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)]))
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def greedy_generate(model, data: GenerationExamples, pad_id: int, max_new_tokens: int,
                    batch_size: int = 16) -> list[list[int]]:
    """The greedy continuation of every prompt, cut before its first stop token (in data's order)."""
    from transformers import GenerationConfig

    stops = list(data.stop_ids)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=stops or None)
    device, was_training = _device(model), model.training
    order = sorted(range(len(data)), key=lambda i: len(data.prompt_ids[i]))  # less padding per batch
    out: list[list[int]] = [[] for _ in range(len(data))]
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([(data.prompt_ids[i], []) for i in chunk], pad_id, device)
            width = batch["input_ids"].shape[1]
            with compute_context(model):
                gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     generation_config=config)
            for i, row in zip(chunk, gen[:, width:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                out[i] = row[:cut]
    finally:
        model.train(was_training)
    return out


@torch.inference_mode()
def perplexity(model, data: GenerationExamples, pad_id: int, batch_size: int = 16) -> float:
    """exp(total NLL of the reference response tokens / their number) under the loaded adapter."""
    if len(data) == 0:
        return float("nan")
    device, was_training = _device(model), model.training
    order = sorted(range(len(data)), key=lambda i: int(data.lengths[i]))
    total, count = 0.0, 0
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            pairs = [data.pair(i) for i in order[start : start + batch_size]]
            logp, n = target_logprobs(model, collate(pairs, pad_id, device))
            total, count = total - float(logp.sum()), count + int(n.sum())
    finally:
        model.train(was_training)
    return math.exp(total / count) if count else float("nan")


def generation_metrics(model, tokenizer, data: GenerationExamples, pad_id: int, max_new_tokens: int,
                       batch_size: int = 16, samples: int = 0) -> tuple[dict, list[dict]]:
    """(metrics row, the first `samples` examples' generations) of the loaded adapter on `data`."""
    generated = greedy_generate(model, data, pad_id, max_new_tokens, batch_size) if len(data) else []
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    row = {**text_metrics(texts, data.references), "perplexity": perplexity(model, data, pad_id, batch_size),
           "n": len(data)}
    shown = [{"set": data.name, "line": data.lines[i] if data.lines else None, "prompt": data.prompts[i] if data.prompts else "",
              "reference": data.references[i], "generation": texts[i],
              "rougeL": rouge(texts[i], data.references[i])["rougeL"],
              "exact_match": exact_match(texts[i], data.references[i])}
             for i in range(min(samples, len(data)))]
    return row, shown
