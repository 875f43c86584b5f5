"""Classification by label likelihood, and the metrics we report.

For a prompt x and classes c = 1..C with verbalizer tokens v_c, the score is
log p(v_c | x) = sum_t log p(v_c,t | x, v_c,<t). The prediction is argmax_c; class
probabilities for AUROC are softmax over the C scores. No free generation is needed, so the
model cannot answer outside the label set.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from fedlora.train.batches import EncodedExamples, collate, target_logprobs


@torch.no_grad()
def label_loglik(model, data: EncodedExamples, pad_id: int, batch_size: int = 16) -> np.ndarray:
    """[n, C] log-likelihood of each class's verbalizer after each prompt."""
    n, num_classes = len(data), len(data.verbalizer_ids)
    if n == 0:
        return np.zeros((0, num_classes))
    device = next(model.parameters()).device
    if all(len(v) == 1 for v in data.verbalizer_ids):
        return _single_token_loglik(model, data, pad_id, batch_size, device)
    jobs = [(i, c) for i in range(n) for c in range(num_classes)]
    # Similar lengths in one batch waste less compute on padding.
    jobs.sort(key=lambda job: len(data.prompt_ids[job[0]]))
    scores = np.zeros((n, num_classes))
    was_training = model.training
    model.eval()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        pairs = [(data.prompt_ids[i], data.verbalizer_ids[c]) for i, c in chunk]
        logp, _ = target_logprobs(model, collate(pairs, pad_id, device))
        for (i, c), value in zip(chunk, logp.tolist()):
            scores[i, c] = value
    model.train(was_training)
    return scores


@torch.no_grad()
def _single_token_loglik(model, data: EncodedExamples, pad_id: int, batch_size: int, device) -> np.ndarray:
    """Fast path when every verbalizer is one token: one forward per prompt scores all classes.

    Gives the same numbers as the general path (log p of the label's only token after the
    prompt) at 1/C of its cost.
    """
    tokens = torch.tensor([v[0] for v in data.verbalizer_ids], device=device)
    order = sorted(range(len(data)), key=lambda i: len(data.prompt_ids[i]))
    scores = np.zeros((len(data), len(tokens)))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([(data.prompt_ids[i], []) for i in chunk], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=1).logits[:, -1].float()
        picked = torch.log_softmax(logits, dim=-1)[:, tokens]
        scores[chunk] = picked.cpu().numpy()
    model.train(was_training)
    return scores


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
