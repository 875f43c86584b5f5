"""Token batches (left padding, positions, target alignment) and label-likelihood evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import wrapped_tiny
from fedlora.model.lora import adapter_parameters, init_adapter_state, load_adapter_state
from fedlora.train.batches import EncodedExamples, collate, encode_examples, target_logprobs
from fedlora.train.evaluate import classification_metrics, evaluate, label_loglik

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_tok():
    """A wrapped tiny model with a non-zero adapter, so LoRA takes part in every forward."""
    model, tok = wrapped_tiny(seed=0)
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(p.shape, generator=gen) * 0.1 for k, p in adapter_parameters(model).items()}
    load_adapter_state(model, state)
    return model, tok


@pytest.fixture(scope="module")
def examples(model_tok) -> EncodedExamples:
    """Seven prompts of different lengths, single-token verbalizers."""
    _, tok = model_tok
    prompts = ["age is 3. Answer:", "the patient is young and the tumor is small. Answer:",
               "radius is 12.5. texture is 3. Answer:", "yes", "Question: Is the client good? Answer:",
               "a b c d e f g h i j k l m n o p", "income is high. Answer:"]
    labels = np.array([0, 1, 1, 0, 1, 0, 1])
    enc = encode_examples(tok, prompts, labels, [" no", " yes"], max_length=64)
    assert all(len(v) == 1 for v in enc.verbalizer_ids)
    assert len({len(p) for p in enc.prompt_ids}) >= 4  # really different lengths
    return enc


def _reference_logprob(model, prompt: list[int], target: list[int]) -> float:
    """sum_t log p(target_t | prompt, target_<t) from one unpadded forward over the whole sequence."""
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    return float(sum(logp[start - 1 + t, tok] for t, tok in enumerate(target)))


# --- collate -----------------------------------------------------------------------------------


def test_collate_left_pads_and_aligns_targets():
    batch = collate([([1, 2, 3], [9]), ([4], [7, 8]), ([5, 6], [])], pad_id=0, device=CPU)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [0, 4, 7, 8], [0, 0, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 1]]
    # targets span the last (longest target) positions, right-aligned, -100 elsewhere
    assert batch["targets"].tolist() == [[-100, 9], [7, 8], [-100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_prompt_only_batch():
    batch = collate([([1, 2], []), ([3], [])], pad_id=5, device=CPU)
    assert batch["input_ids"].tolist() == [[1, 2], [5, 3]]
    assert batch["targets"].shape == (2, 0)


def test_encode_examples_keeps_prompt_end_and_bos(model_tok):
    _, tok = model_tok
    long_prompt = " ".join(["tumor"] * 100) + " Answer:"
    enc = encode_examples(tok, [long_prompt, "short Answer:"], np.array([0, 1]), [" no", " yes"], max_length=16)
    verbal = max(len(v) for v in enc.verbalizer_ids)
    assert len(enc.prompt_ids[0]) == 16 - verbal
    assert enc.prompt_ids[0][0] == tok.bos_token_id and enc.prompt_ids[1][0] == tok.bos_token_id
    answer = tok(" Answer:", add_special_tokens=False)["input_ids"]
    assert enc.prompt_ids[0][-len(answer):] == answer
    assert enc.labels.dtype == np.int64 and len(enc) == 2
    sub = enc.subset(np.array([1]))
    assert len(sub) == 1 and sub.labels.tolist() == [1] and sub.prompt_ids[0] == enc.prompt_ids[1]


def test_encode_examples_rejects_bad_verbalizers(model_tok):
    _, tok = model_tok
    with pytest.raises(ValueError, match="identically"):
        encode_examples(tok, ["x"], np.array([0]), [" yes", " yes"], max_length=64)
    with pytest.raises(ValueError, match="nothing"):
        encode_examples(tok, ["x"], np.array([0]), ["", " yes"], max_length=64)
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(tok, ["x"], np.array([0]), [" no", " yes"], max_length=4)


def test_target_logprobs_matches_unpadded_reference(model_tok):
    model, _ = model_tok
    pairs = [([1, 40, 41, 42, 43], [50]), ([1, 60], [70, 71, 72]), ([1, 80, 81], [90, 91])]
    logp, count = target_logprobs(model, collate(pairs, model.config.pad_token_id, CPU))
    assert count.tolist() == [1, 3, 2]
    for value, (prompt, target) in zip(logp.tolist(), pairs):
        assert value == pytest.approx(_reference_logprob(model, prompt, target), abs=1e-4)


# --- label_loglik ------------------------------------------------------------------------------


def test_label_loglik_padding_invariance(model_tok, examples):
    model, tok = model_tok
    one = label_loglik(model, examples, tok.pad_token_id, batch_size=1)
    five = label_loglik(model, examples, tok.pad_token_id, batch_size=5)
    assert one.shape == (7, 2) and np.all(one < 0)
    np.testing.assert_allclose(one, five, atol=1e-4, rtol=0)


def test_single_token_fast_path_matches_reference(model_tok, examples):
    model, tok = model_tok
    fast = label_loglik(model, examples, tok.pad_token_id, batch_size=4)
    for i, prompt in enumerate(examples.prompt_ids):
        for c, verb in enumerate(examples.verbalizer_ids):
            assert fast[i, c] == pytest.approx(_reference_logprob(model, prompt, verb), abs=1e-4)


def test_general_path_matches_fast_path_and_reference(model_tok, examples):
    """A third, two-token verbalizer forces the general path; the first two columns must not move."""
    model, tok = model_tok
    extra = tok(" malignant tumor", add_special_tokens=False)["input_ids"]
    assert len(extra) >= 2
    multi = EncodedExamples(examples.prompt_ids, examples.labels, examples.verbalizer_ids + [extra])
    general = label_loglik(model, multi, tok.pad_token_id, batch_size=3)
    fast = label_loglik(model, examples, tok.pad_token_id, batch_size=3)
    assert general.shape == (7, 3)
    np.testing.assert_allclose(general[:, :2], fast, atol=1e-4, rtol=0)
    for i, prompt in enumerate(multi.prompt_ids):
        for c, verb in enumerate(multi.verbalizer_ids):
            assert general[i, c] == pytest.approx(_reference_logprob(model, prompt, verb), abs=1e-4)
    # per-row batches agree with mixed batches on the general path too
    np.testing.assert_allclose(label_loglik(model, multi, tok.pad_token_id, batch_size=1), general, atol=1e-4)


def test_label_loglik_restores_training_mode_and_handles_empty(model_tok, examples):
    model, tok = model_tok
    model.train()
    try:
        label_loglik(model, examples.subset(np.arange(2)), tok.pad_token_id)
        assert model.training
    finally:
        model.eval()
    empty = label_loglik(model, examples.subset(np.arange(0)), tok.pad_token_id)
    assert empty.shape == (0, 2)


def test_zero_b_adapter_scores_like_base_model(examples):
    """B = 0 makes the adapter a no-op: scores equal the unwrapped model's."""
    from fedlora.model import build_tiny_model

    model, tok = wrapped_tiny(seed=3)
    load_adapter_state(model, init_adapter_state(model, 3))
    base, _ = build_tiny_model(0)
    np.testing.assert_allclose(label_loglik(model, examples, tok.pad_token_id),
                               label_loglik(base, examples, tok.pad_token_id), atol=1e-5)


def test_evaluate_returns_metrics(model_tok, examples):
    model, tok = model_tok
    out = evaluate(model, examples, tok.pad_token_id, batch_size=4)
    scores = label_loglik(model, examples, tok.pad_token_id)
    assert out == pytest.approx(classification_metrics(scores, examples.labels), nan_ok=True)
    assert out["n"] == 7 and 0 <= out["accuracy"] <= 1


# --- classification_metrics --------------------------------------------------------------------


def _binary_scores(diff):
    """Log-scores whose class-1 minus class-0 difference is `diff`."""
    diff = np.asarray(diff, dtype=float)
    return np.stack([np.zeros_like(diff), diff], axis=1) - 3.0


def test_metrics_binary_known_answer():
    # labels 0,0,1,1; class-1 margin -2, 1, 0.5, 3 -> predictions 0,1,1,1
    out = classification_metrics(_binary_scores([-2, 1, 0.5, 3]), np.array([0, 0, 1, 1]))
    assert out["accuracy"] == pytest.approx(0.75)
    # class 0: P=1, R=1/2, F1=2/3; class 1: P=2/3, R=1, F1=4/5; macro = 11/15
    assert out["macro_f1"] == pytest.approx(11 / 15)
    # positive pairs ranked above negatives: (0.5>-2), (3>-2), (3>1) but not (0.5>1) -> 3/4
    assert out["auroc"] == pytest.approx(0.75)
    assert out["n"] == 4


def test_metrics_perfect_and_inverted():
    labels = np.array([0, 1, 0, 1])
    good = classification_metrics(_binary_scores([-1, 1, -2, 2]), labels)
    bad = classification_metrics(_binary_scores([1, -1, 2, -2]), labels)
    assert (good["accuracy"], good["macro_f1"], good["auroc"]) == (1.0, 1.0, 1.0)
    assert (bad["accuracy"], bad["macro_f1"], bad["auroc"]) == (0.0, 0.0, 0.0)


def test_metrics_single_class_auroc_nan():
    out = classification_metrics(_binary_scores([-1, 2, -3]), np.array([1, 1, 1]))
    assert math.isnan(out["auroc"])
    assert out["accuracy"] == pytest.approx(1 / 3)
    # class 0 has no true rows and one false positive -> F1 0; class 1: P=1, R=1/3 -> F1 1/2
    assert out["macro_f1"] == pytest.approx(0.25)


def test_metrics_multiclass():
    scores = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]]))
    out = classification_metrics(scores, np.array([0, 1, 2, 1]))
    assert out["accuracy"] == pytest.approx(0.75)
    # F1: class 0 P=1/2 R=1 -> 2/3; class 1 P=1 R=1/2 -> 2/3; class 2 -> 1
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    from sklearn.metrics import roc_auc_score

    assert out["auroc"] == pytest.approx(roc_auc_score([0, 1, 2, 1], np.exp(scores), multi_class="ovr"))
    missing = classification_metrics(scores[:3], np.array([0, 1, 1]))  # class 2 absent
    assert math.isnan(missing["auroc"])
