"""Classification by label likelihood, and the metrics we report.

For a prompt x and classes c = 1..C with verbalizer tokens v_c, the score is
log p(v_c | x) = sum_t log p(v_c,t | x, v_c,<t). The prediction is argmax_c; class
probabilities for AUROC are softmax over the C scores. No free generation is needed, so the
model cannot answer outside the label set.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from fedlora.model.precision import compute_context
from fedlora.train.batches import EncodedExamples, collate, forward_logits


@torch.no_grad()
def label_loglik(model, data: EncodedExamples, pad_id: int, batch_size: int = 16) -> np.ndarray:
    """[n, C] log-likelihood of each class's verbalizer after each prompt.

    Each prompt is encoded once, whatever the number of classes and verbalizer tokens: one
    forward over a batch of prompts gives every class's first-token log-prob from the last
    prompt position; for verbalizers of more than one token, each class's remaining tokens are
    then run on top of the prompts' KV cache (a forward of len(v_c) - 1 positions), and the cache
    is cropped back to the prompt before the next class. The scores equal those of encoding each
    (prompt, verbalizer) pair on its own (tests/test_batches_evaluate.py), at about 1/C of the cost.
    """
    n, num_classes = len(data), len(data.verbalizer_ids)
    if n == 0:
        return np.zeros((0, num_classes))
    device = next(model.parameters()).device
    # Similar lengths in one batch waste less compute on padding.
    order = sorted(range(n), key=lambda i: len(data.prompt_ids[i]))
    scores = np.zeros((n, num_classes))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([(data.prompt_ids[i], []) for i in chunk], pad_id, device)
            scores[chunk] = _prompt_batch_scores(model, batch, data.verbalizer_ids).cpu().numpy()
    finally:
        model.train(was_training)
    return scores


def _prompt_batch_scores(model, batch: dict[str, torch.Tensor], verbalizers: list[list[int]]) -> torch.Tensor:
    """[B, C] scores of every verbalizer after a batch of left-padded prompts (see label_loglik)."""
    multi = any(len(v) > 1 for v in verbalizers)
    if not multi:  # one token each: the last prompt position scores every class
        first = torch.log_softmax(forward_logits(model, batch, keep=1)[:, -1], dim=-1)
        return first[:, [v[0] for v in verbalizers]]
    first, cache = _encode_prompts(model, batch)
    width, rows = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
    last_position = batch["position_ids"][:, -1:]
    scores = torch.zeros((rows, len(verbalizers)), device=first.device)
    for c, verbalizer in enumerate(verbalizers):
        scores[:, c] = first[:, verbalizer[0]]
        if len(verbalizer) == 1:
            continue
        if cache.get_seq_length() != width:  # a cache that could not be cropped: encode again
            _, cache = _encode_prompts(model, batch)
        # Feed v_0 .. v_{T-2} after the prompt; position t predicts v_{t+1}.
        steps = len(verbalizer) - 1
        feed = torch.tensor(verbalizer[:-1], device=first.device).expand(rows, steps)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(feed)], dim=1)
        positions = last_position + torch.arange(1, steps + 1, device=first.device)
        with compute_context(model):
            logits = model(input_ids=feed, attention_mask=mask, position_ids=positions,
                           use_cache=True, **{_cache_argument(model): cache}).logits.float()
        targets = torch.tensor(verbalizer[1:], device=first.device).expand(rows, steps)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores[:, c] += picked.sum(dim=1)
        try:
            cache.crop(-steps)  # back to the prompt alone for the next class
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
            pass
    return scores


def _encode_prompts(model, batch: dict[str, torch.Tensor]):
    """First-token log-probs after each prompt [B, V] and the prompts' KV cache."""
    with compute_context(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=1, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), cache


def _cache_argument(model) -> str:
    """The forward argument that takes a KV cache: 'cache' in transformers >= 5.2x, before that
    'past_key_values' (the old name still works there but warns)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC (binary: of the last class; multi-class: one-vs-rest macro).

    AUROC is NaN when the evaluated set holds a single class (it is undefined there), which
    happens on small, label-skewed client splits; means over clients skip NaN.
    """
    labels = np.asarray(labels)
    num_classes = scores.shape[1]
    pred = scores.argmax(axis=1)
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(num_classes)),
                                   zero_division=0)),
        "auroc": float("nan"),
        "n": int(len(labels)),
    }
    if len(np.unique(labels)) > 1:
        if num_classes == 2:
            out["auroc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            present = np.unique(labels)
            if len(present) == num_classes:
                out["auroc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    return out


def evaluate(model, data: EncodedExamples, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Metrics of `model` (with whatever adapter is loaded) on `data`."""
    return classification_metrics(label_loglik(model, data, pad_id, batch_size), data.labels)
