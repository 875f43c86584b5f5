"""Calibrated label scoring (train/calibration.py, fl/scoring.py): known answers, a reference
implementation, and that a fit only ever sees validation and content-free scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from conftest import make_config
from fedlora import prepare, run
from fedlora.config import ConfigError
from fedlora.data import RowSerializer, load_table
from fedlora.experiment import zero_shot
from fedlora.fl.engine import Simulator
from fedlora.fl.gossip import GossipSimulator
from fedlora.train import calibration
from fedlora.train.batches import encode_examples
from fedlora.train.calibration import (Calibration, calibrated_metrics, expected_calibration_error, fit,
                                       fit_bias, fit_contextual)
from fedlora.train.encode import CONTENT_FREE_TOKENS, encode_content_free
from fedlora.train.evaluate import classification_metrics


# --- the fits: known answers on tiny score matrices ---------------------------------------------
def test_contextual_offset_is_minus_log_mean_softmax():
    cf = np.log(np.array([[0.2, 0.8], [0.4, 0.6]]))  # softmax of log-probs = the probs
    cal = fit_contextual(cf)
    np.testing.assert_allclose(cal.offset, -np.log([0.3, 0.7]))
    assert cal.scale == 1.0 and cal.bias.size == 0
    # three classes, unnormalized scores: softmax first, then the mean over prompts
    cf3 = np.array([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    p = (softmax(cf3[0]) + softmax(cf3[1])) / 2
    np.testing.assert_allclose(fit_contextual(cf3).offset, -np.log(p))
    # the paper's W = diag(p_cf)^-1: calibrated probabilities are p / p_cf, renormalized
    s = np.log(np.array([[0.5, 0.3, 0.2]]))
    q = np.array([0.5, 0.3, 0.2]) / p
    np.testing.assert_allclose(softmax(fit_contextual(cf3).apply(s), axis=1)[0], q / q.sum())


def test_bias_on_constant_scores_gives_log_class_frequency_ratios():
    labels = np.array([0] + [1] * 2 + [2] * 5)
    cal = fit_bias(np.zeros((len(labels), 3)), labels, l2=0.0)
    b = cal.bias - cal.bias[0]
    np.testing.assert_allclose(b, np.log([1.0, 2.0, 5.0]), atol=1e-5)
    # the calibrated probabilities are the class frequencies
    np.testing.assert_allclose(softmax(cal.apply(np.zeros((1, 3))), axis=1)[0], [1 / 8, 2 / 8, 5 / 8], atol=1e-6)


def test_binary_bias_matches_sklearn_logistic_regression():
    """For C = 2 with l2 = 0 the fit is logistic regression on s_1 - s_0 (Platt scaling): the
    reference is sklearn's LogisticRegression with (practically) no regularization."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.stack([rng.normal(0, 1, 200), 0.8 * labels + rng.normal(-1.5, 1, 200)], axis=1)
    cal = fit_bias(scores, labels, l2=0.0)
    diff = (scores[:, 1] - scores[:, 0])[:, None]
    ref = LogisticRegression(C=1e10, tol=1e-12, max_iter=10_000).fit(diff, labels)
    assert cal.scale == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert cal.bias[1] - cal.bias[0] == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-5)
    # a monotone map of s_1 - s_0: binary AUROC is unchanged
    metrics = calibrated_metrics(scores, labels, "bias", {"bias": cal})
    assert metrics["auroc_cal"] == metrics["auroc"] == pytest.approx(roc_auc_score(labels, diff[:, 0]))


def test_both_is_bias_on_the_contextual_offset():
    rng = np.random.default_rng(1)
    scores, labels, cf = rng.normal(size=(30, 3)), rng.integers(0, 3, 30), rng.normal(size=(3, 3))
    both = fit("both", scores, labels, cf)
    offset = fit_contextual(cf).offset
    ref = fit_bias(scores + offset, labels)
    np.testing.assert_allclose(both.offset, offset)
    np.testing.assert_allclose(both.apply(scores), ref.apply(scores + offset), atol=1e-6)


def test_identity_calibration_leaves_predictions_unchanged():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    for identity in (Calibration(), fit("none"), fit_bias(scores, labels[:0])):
        np.testing.assert_array_equal(identity.apply(scores).argmax(1), scores.argmax(1))
    raw = calibrated_metrics(scores, labels, "none", {})
    assert raw == {**classification_metrics(scores, labels), "ece": raw["ece"]}  # no _cal columns
    same = calibrated_metrics(scores, labels, "bias", {"bias": Calibration()})
    for m in ("accuracy", "macro_f1", "auroc", "ece"):
        assert same[f"{m}_cal"] == pytest.approx(same[m])


def test_ece_by_hand():
    # confidences 0.85 (right) in bin (0.8, 0.9]; 0.65 (wrong) and 0.65 (right) in (0.6, 0.7];
    # 0.55 (right) in (0.5, 0.6]: ECE = sum of (share of rows) * |accuracy - mean confidence|
    probs = np.array([[0.85, 0.15], [0.35, 0.65], [0.65, 0.35], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    expected = 0.25 * abs(1 - 0.85) + 0.5 * abs(0.5 - 0.65) + 0.25 * abs(1 - 0.55)
    assert expected_calibration_error(np.log(probs), labels) == pytest.approx(expected)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), labels[:0]))


def test_unknown_kind_and_bad_config_values_are_clear():
    with pytest.raises(ValueError, match="unknown calibration 'platt'"):
        fit("platt")
    with pytest.raises(ConfigError, match=r"eval.calibration: unknown value 'bothh'; did you mean both\?"):
        make_config("eval.calibration=bothh")
    with pytest.raises(ConfigError, match="eval.global_calibration: unknown value"):
        make_config("eval.global_calibration=pooled")
    with pytest.raises(ConfigError, match="eval.max_examples is null"):
        make_config("eval.calibration=bias", "eval.global_calibration=holdout", "eval.max_examples=null")
    # 120 rows, 20 % global test = 24 rows, all of them test under max_examples=30: no holdout left
    with pytest.raises(ConfigError, match="global-test pool has 24"):
        prepare(make_config("eval.calibration=bias", "eval.global_calibration=holdout", "eval.max_examples=30"))


# --- content-free prompts ----------------------------------------------------------------------
def test_content_free_prompts_go_through_the_real_prompt_path(fed):
    cfg = fed.cfg.data
    cf = encode_content_free(fed.tokenizer, fed.table, cfg)
    assert len(cf) == len(CONTENT_FREE_TOKENS) and (cf.labels == -1).all()
    assert cf.verbalizer_ids == fed.global_test.verbalizer_ids
    ser = RowSerializer(fed.table, cfg)
    text = ser.content_free_prompt("N/A")
    assert text.startswith("mean radius is N/A. mean texture is N/A.") and text.endswith("\nAnswer:")
    assert text.split("\n")[1:] == ser.fit(fed.table.frame).prompt(fed.table.frame.iloc[0]).split("\n")[1:]
    ref = encode_examples(fed.tokenizer, [text], np.zeros(1), ser.verbalizers, cfg.max_length,
                          cfg.prompt_style, cfg.system_prompt)
    assert cf.prompt_ids[0] == ref.prompt_ids[0]


def test_content_free_text_task_is_the_token_itself(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(6)))
    table = load_table(make_config(f"data.source={path}", "data.columns=null", "data.max_rows=null").data)
    ser = RowSerializer(table, make_config().data)
    assert ser.content_free_prompt("[MASK]").startswith("[MASK]\nQuestion:")


# --- the fit never sees a test split -----------------------------------------------------------
def _recording(monkeypatch):
    """Record every set the scorer scores (with its scores) and every fit's inputs."""
    from fedlora.fl import scoring

    scored, fits = [], []
    real_loglik, real_fit = scoring.label_loglik, calibration.fit

    def loglik(model, data, pad_id, batch_size=16):
        out = real_loglik(model, data, pad_id, batch_size)
        scored.append((data, out))
        return out

    def recording_fit(kind, val_scores=None, val_labels=None, content_free_scores=None, l2=1.0):
        fits.append((kind, val_scores, val_labels, content_free_scores))
        return real_fit(kind, val_scores, val_labels, content_free_scores, l2)

    monkeypatch.setattr(scoring, "label_loglik", loglik)
    monkeypatch.setattr(calibration, "fit", recording_fit)
    return scored, fits


def _assert_fits_saw_no_test(fed, scored, fits):
    """Every fit's scores are rows of scored validation (or holdout) sets and its content-free
    scores rows of the content-free set; no row of a scored test set; labels are a client's own
    validation labels, all of them pooled, or the holdout's."""
    tests = [fed.global_test, *(c.test for c in fed.clients)] + ([fed.shifted_test] if fed.shifted_test else [])
    allowed = [c.val for c in fed.clients] + ([fed.global_holdout] if fed.global_holdout is not None else [])

    def is_in(data, sets):
        return any(data is s for s in sets)

    test_rows = {r.tobytes() for data, out in scored if is_in(data, tests) for r in out}
    cal_rows = {r.tobytes() for data, out in scored if is_in(data, allowed) for r in out}
    cf_rows = {r.tobytes() for data, out in scored if len(data) and (data.labels == -1).all() for r in out}
    assert test_rows and cal_rows and cf_rows  # test sets were scored, and calibration sets too
    assert all(is_in(data, tests + allowed) or (data.labels == -1).all() for data, _ in scored)
    label_sets = [s.labels for s in allowed] + [np.concatenate([c.val.labels for c in fed.clients])]
    assert fits
    for kind, val_scores, labels, cf in fits:
        rows = {r.tobytes() for r in val_scores}
        assert rows <= cal_rows and not rows & test_rows, kind
        assert {r.tobytes() for r in cf} <= cf_rows and len(cf) == len(CONTENT_FREE_TOKENS)
        assert any(np.array_equal(labels, s) for s in label_sets)


@pytest.mark.parametrize("global_calibration", ["pooled_val", "holdout"])
def test_fit_receives_only_validation_and_content_free_scores(monkeypatch, global_calibration):
    cfg = make_config("eval.calibration=both", f"eval.global_calibration={global_calibration}",
                      "eval.max_examples=6", "fl.rounds=1", "data.shift_column=mean radius")
    fed = prepare(cfg)
    assert (fed.global_holdout is not None) == (global_calibration == "holdout")
    if fed.global_holdout is not None:  # drawn from the pool, disjoint from the global test
        assert len(fed.global_holdout) == 6
        assert not {tuple(p) for p in fed.global_holdout.prompt_ids} & {tuple(p) for p in fed.global_test.prompt_ids}
    scored, fits = _recording(monkeypatch)
    zero_shot(fed)
    rows = Simulator(fed, "fedit").run().rows + Simulator(fed, "local").run().rows
    _assert_fits_saw_no_test(fed, scored, fits)
    pooled = sum(len(c.val) for c in fed.clients)
    expected = (fed.global_holdout.labels if global_calibration == "holdout"
                else np.concatenate([c.val.labels for c in fed.clients]))
    assert any(np.array_equal(labels, expected) for _, _, labels, _ in fits)
    glob = [r for r in rows if r["client"] in ("global", "shifted")]
    assert glob and all("accuracy_cal" in r for r in glob)
    assert {r["n_cal"] for r in glob} == {6 if global_calibration == "holdout" else pooled}


def test_gossip_fit_receives_only_validation_scores(monkeypatch):
    fed = prepare(make_config("eval.calibration=both", "fl.rounds=1"))
    scored, fits = _recording(monkeypatch)
    rows = GossipSimulator(fed, "dec_lora").run().rows
    _assert_fits_saw_no_test(fed, scored, fits)
    clients = [r for r in rows if isinstance(r["client"], int) and "accuracy" in r]
    assert all({"accuracy_cal", "global_accuracy_cal", "global_ece_cal"} <= set(r) for r in clients)
    glob = [r for r in rows if r["client"] == "global"]
    assert glob[0]["accuracy_cal"] == pytest.approx(np.nanmean([r["global_accuracy_cal"] for r in clients]))


# --- end to end: rows, summary, comparison, report -------------------------------------------
def test_tiny_run_with_both_reports_calibrated_columns(tmp_path):
    out = run(make_config("eval.calibration=both", output_dir=tmp_path), quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["round"] == 2 and "accuracy" in r]
    cal_cols = {"accuracy_cal", "macro_f1_cal", "auroc_cal", "ece", "ece_cal", "accuracy_contextual",
                "accuracy_bias", "n_cal"}
    assert final and all(cal_cols <= set(r) and r["calibration"] == "both" for r in final)
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy_cal", "macro_f1_cal", "ece", "ece_cal"} <= set(summary["clients"])
    assert {"accuracy_cal", "ece_cal"} <= set(summary["global"])
    table = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert table["zero-shot"]["clients"]["accuracy_cal"]["count"] == 3  # zero-shot calibrated the same way
    assert "accuracy_cal" not in table["baseline-logreg"]["clients"]  # the baseline keeps its own rule
    md = (out / "comparison.md").read_text()
    assert "| client acc cal | client macro-F1 cal | client ECE | client ECE cal |" in md
    assert "global ECE cal" in (out / "report.html").read_text()


def test_no_calibration_keeps_the_table_and_adds_only_ece(tmp_path):
    out = run(make_config("fl.rounds=1", "eval.calibration=none", output_dir=tmp_path), quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "accuracy" in r]
    assert all("ece" in r and not any(k.endswith("_cal") for k in r) for r in scored)
    md = (out / "comparison.md").read_text()
    assert md.splitlines()[0].endswith("| global AUROC | MB sent (up+down) |") and "cal" not in md.splitlines()[0]


def test_multiclass_multitoken_verbalizers(tmp_path):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"age": rng.integers(20, 80, 150), "region": rng.choice(["north", "south"], 150)})
    frame["outcome"] = np.select([frame["age"] < 40, frame["age"] < 60], ["quite well", "mildly unwell"],
                                 "very seriously sick")
    path = tmp_path / "three.csv"
    frame.to_csv(path, index=False)
    cfg = make_config(f"data.source={path}", "data.target=outcome", "data.columns=null", "data.max_rows=null",
                      "eval.calibration=both", "eval.global_calibration=holdout", "eval.max_examples=8",
                      "fl.rounds=1", output_dir=tmp_path / "runs")
    fed = prepare(cfg)
    assert len(fed.table.classes) == 3 and max(len(v) for v in fed.global_test.verbalizer_ids) > 1
    rows = Simulator(fed, "fedit").run().rows
    scored = [r for r in rows if "accuracy" in r]
    assert scored and all({"accuracy_cal", "macro_f1_cal", "ece_cal", "accuracy_contextual"} <= set(r)
                          for r in scored)
    assert all(0 <= r["accuracy_cal"] <= 1 and 0 <= r["ece_cal"] <= 1 for r in scored)


def test_flower_node_calibrates_on_its_own_validation_split():
    """A Flower node fits on its own validation split, as the simulator's client does: same rows."""
    pytest.importorskip("flwr")
    from conftest import strip_times
    from test_flower import FLOWER_OVERRIDES, _in_process

    cfg = make_config("eval.calibration=both", *FLOWER_OVERRIDES)
    ref = Simulator(prepare(cfg), "fedit").run().rows
    coord, _, _ = _in_process(cfg)
    tested = [r for r in strip_times(coord.rows) if r.get("split") == "test"]
    assert tested and all("accuracy_cal" in r for r in tested)
    assert tested == [r for r in strip_times(ref) if r.get("split") == "test"]
