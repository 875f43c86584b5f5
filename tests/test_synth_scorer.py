"""Concordia level 2 (synth/features.py, influence.py, scorer.py): features, influence, the scorer, weights, rewards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import base_snapshot, assert_same_tensors, wrapped_tiny
from fedlora.config import DataConfig
from fedlora.data import RowSerializer
from fedlora.data.tables import ColumnInfo, Table, load_table
from fedlora.fl.federation import _encode
from fedlora.fl.payload import decode, encode, spec_of
from fedlora.model.lora import adapter_parameters, set_trainable
from fedlora.synth.features import RowFeaturizer, encode_rows
from fedlora.synth.influence import influence_targets
from fedlora.synth.scorer import (
    ScorerConfig, UtilityScorer, ensemble_utility, fit_client_scorer, local_utility, sample_weights, scorer_nbytes,
)
from fedlora.train.batches import collate, target_logprobs

COLUMNS = ["mean radius", "mean texture", "mean perimeter", "mean area", "mean concave points"]


# ------------------------------------------------------------------------------------ features


def _toy_table() -> Table:
    frame = pd.DataFrame({
        "age": [20.0, 40.0, 60.0],
        "color": ["red", "blue", None],
        "smoker": pd.array([True, False, None], dtype="boolean"),
        "label": ["no", "yes", "no"],
    })
    columns = [ColumnInfo("age", "numeric"), ColumnInfo("color", "categorical"), ColumnInfo("smoker", "boolean")]
    return Table("toy", frame, "label", columns, ["no", "yes"], "tabular")


def test_featurizer_known_answer():
    table = _toy_table()
    feat = RowFeaturizer(table)
    assert feat.names == ["age", "age=<missing>", "color=blue", "color=red", "color=<other/missing>",
                          "smoker=no", "smoker=yes", "smoker=<other/missing>", "label=no", "label=yes"]
    X = feat.transform(table.frame)
    expected = np.array([
        [0.0, 0, 0, 1, 0, 0, 1, 0, 1, 0],
        [0.5, 0, 1, 0, 0, 1, 0, 0, 0, 1],
        [1.0, 0, 0, 0, 1, 0, 0, 1, 1, 0],
    ], dtype=np.float32)
    np.testing.assert_array_equal(X, expected)
    assert X.dtype == np.float32 and feat.dim == 10
    # Synthetic rows: out of range (clipped), missing, unseen category, boolean as text, column order.
    synth = pd.DataFrame({"label": ["yes", "no"], "smoker": ["yes", "maybe"], "color": ["green", "red"],
                          "age": [1e9, np.nan]})
    np.testing.assert_array_equal(feat.transform(synth), np.array([
        [2.0, 0, 0, 0, 1, 0, 1, 0, 0, 1],
        [0.0, 1, 0, 1, 0, 0, 0, 1, 1, 0],
    ], dtype=np.float32))
    # A row's features depend on that row only (nothing is learned from the transformed frame).
    np.testing.assert_array_equal(feat.transform(table.frame.iloc[::-1]), X[::-1])
    np.testing.assert_array_equal(feat.transform(table.frame.iloc[[1]]), X[[1]])
    # A published data dictionary overrides the table's ranges.
    assert RowFeaturizer(table, ranges={"age": (0.0, 100.0)}).transform(table.frame)[1, 0] == pytest.approx(0.4)


def test_featurizer_rejects_bad_rows():
    feat = RowFeaturizer(_toy_table())
    with pytest.raises(ValueError, match="lack column"):
        feat.transform(pd.DataFrame({"age": [1.0], "label": ["no"]}))
    with pytest.raises(ValueError, match="outside the classes"):
        feat.transform(pd.DataFrame({"age": [1.0], "color": ["red"], "smoker": [True], "label": ["maybe"]}))
    with pytest.raises(ValueError, match="no rows"):
        feat.transform(_toy_table().frame.iloc[:0])


# ------------------------------------------------------------------------- weights and rewards


def test_sample_weights_known_answers_and_limits():
    np.testing.assert_allclose(sample_weights([0.0, np.log(2.0)], standardize=False), [2 / 3, 4 / 3])
    scores = np.array([0.3, -1.2, 2.5, 0.0, 1.1])
    for mode in ("softmax", "clip"):
        for tau in (0.1, 1.0, 10.0):
            w = sample_weights(scores, tau, mode)
            assert w.mean() == pytest.approx(1.0) and (w >= 0).all()
    np.testing.assert_array_equal(sample_weights(scores, float("inf")), np.ones(5))
    assert np.abs(sample_weights(scores, 1e6) - 1).max() < 1e-5          # tau -> inf: uniform
    np.testing.assert_allclose(sample_weights(scores, 1e-3), [0, 0, 5, 0, 0], atol=1e-12)  # tau -> 0
    # Standardised: the weights do not depend on the scores' scale or offset.
    np.testing.assert_allclose(sample_weights(scores * 1e-4 + 7), sample_weights(scores))
    np.testing.assert_allclose(sample_weights([-1.0, 1.0, 3.0], mode="clip"), [0, 0.75, 2.25])
    np.testing.assert_array_equal(sample_weights([-1.0, 0.0], mode="clip"), [1.0, 1.0])
    np.testing.assert_allclose(sample_weights([-1.0, 1.0, 3.0], mode="clip", floor=0.2), [0.2, 0.8, 2.0])
    np.testing.assert_array_equal(sample_weights([0.1 + 0.2, 0.3, 0.3]), np.ones(3))   # rounding is no spread
    for bad in ([], [1.0, np.nan]):
        with pytest.raises(ValueError, match="non-empty"):
            sample_weights(bad)
    with pytest.raises(ValueError, match="temperature"):
        sample_weights(scores, 0.0)
    with pytest.raises(ValueError, match="mode"):
        sample_weights(scores, mode="rank")


def _linear_scorer(scale: float, offset: float) -> UtilityScorer:
    """phi(x) = scale * x0 + offset exactly: gelu(x + 10) = x + 10 in fp32 for x in [0, 1]."""
    scorer = UtilityScorer(dim=1, hidden=1)
    with torch.no_grad():
        scorer.fc1.weight.fill_(1.0)
        scorer.fc1.bias.fill_(10.0)
        scorer.fc2.weight.fill_(1.0)
        scorer.fc2.bias.fill_(-10.0)
        scorer.y_std.fill_(scale)
        scorer.y_mean.fill_(offset)
    return scorer


def test_ensemble_utility_normalises_scales():
    x = np.array([[0.0], [0.25], [0.5], [1.0]], dtype=np.float32)
    z = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std()
    small, large, flat = _linear_scorer(1.0, 0.0), _linear_scorer(1000.0, 5.0), _linear_scorer(1.0, 0.0)
    with torch.no_grad():
        flat.fc1.weight.zero_()
    np.testing.assert_allclose(local_utility(large, x), 1000 * x[:, 0] + 5, rtol=1e-6)
    # Scales 1 and 1000 count equally; a raw mean would just follow the large one.
    np.testing.assert_allclose(ensemble_utility([small, large], x), z, atol=1e-5)
    np.testing.assert_allclose(ensemble_utility([small, flat], x, weights=[3, 1]), 0.75 * z, atol=1e-5)
    np.testing.assert_allclose(ensemble_utility([small, large], x, weights=[0, 2]), z, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        ensemble_utility([small, large], x, weights=[1, -1])
    with pytest.raises(ValueError, match="at least one scorer"):
        ensemble_utility([], x)
    with pytest.raises(ValueError, match="expects"):
        ensemble_utility([small], np.zeros((2, 3), dtype=np.float32))


# ------------------------------------------------------------------------------------- scorer


def test_scorer_fit_recovers_linear_function():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(300, 4)).astype(np.float32)
    y = 1e-3 * (2 * X[:, 0] - X[:, 1]) + 5e-3   # influence-sized targets; score() is on this scale
    scorer = UtilityScorer(4, hidden=32, seed=0)
    scorer.fit(X[:200], y[:200], epochs=200, lr=1e-2, weight_decay=1e-4, seed=0)
    pred = scorer.score(X[200:])
    r2 = 1 - ((pred - y[200:]) ** 2).sum() / ((y[200:] - y[200:].mean()) ** 2).sum()
    assert r2 > 0.9
    ranked = UtilityScorer(4, seed=0)
    ranked.fit(X[:200], y[:200], rank_weight=1.0, seed=0)
    assert np.corrcoef(ranked.score(X[200:]), y[200:])[0, 1] > 0.95
    with pytest.raises(ValueError, match="expects"):
        scorer.fit(X[:, :3], y)
    with pytest.raises(ValueError, match="one finite target"):
        scorer.fit(X[:10], y[:9])


def test_scorer_tensors_round_trip_and_validation():
    scorer = UtilityScorer(7, hidden=5, seed=3)
    scorer.fit(np.eye(7, dtype=np.float32), np.arange(7.0), epochs=5)
    tensors = scorer.to_tensors()
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert scorer_nbytes(scorer) == 4 * (5 * 7 + 5 + 5 + 1 + 1 + 1 + 2)
    # Through the wire format every payload uses, then rebuilt: bitwise equal, same scores.
    received, _ = decode(encode(tensors), expected=spec_of(tensors))
    rebuilt = UtilityScorer.from_tensors(received, dim=7)
    assert_same_tensors(rebuilt.to_tensors(), tensors)
    x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt.score(x), scorer.score(x))
    bad_cases = {
        "shape": {**tensors, "fc1.weight": torch.zeros(5, 6)},
        "NaN": {**tensors, "fc2.bias": torch.tensor([float("nan")])},
        "missing": {k: v for k, v in tensors.items() if k != "y_std"},
        "unexpected": {**tensors, "extra": torch.zeros(1)},
        "float32": {**tensors, "fc1.bias": tensors["fc1.bias"].double()},
        "dims": {**tensors, "dims": torch.tensor([7.5, 5.0])},
        "y_std": {**tensors, "y_std": torch.tensor([0.0])},
    }
    for match, bad in bad_cases.items():
        with pytest.raises(ValueError, match=match):
            UtilityScorer.from_tensors(bad)
    with pytest.raises(ValueError, match="same table schema"):
        UtilityScorer.from_tensors(tensors, dim=8)


# ------------------------------------------------------------------------------------ encoding


def test_encode_rows_matches_federation(fed):
    for client in fed.clients:
        serializer = RowSerializer(fed.table, fed.cfg.data).fit(fed.table.frame.iloc[client.rows["train"]])
        for split in ("train", "val", "test"):
            ours = encode_rows(fed.tokenizer, serializer, fed.table, fed.table.frame.iloc[client.rows[split]],
                               fed.cfg.data.max_length)
            theirs = getattr(client, split)
            assert ours.prompt_ids == theirs.prompt_ids
            np.testing.assert_array_equal(ours.labels, theirs.labels)
            assert ours.verbalizer_ids == theirs.verbalizer_ids


def test_encode_rows_quantile_format_and_bad_rows():
    _, tok = wrapped_tiny()
    cfg = DataConfig(source="breast-cancer", columns=COLUMNS, max_rows=40, number_format="quantile")
    table = load_table(cfg)
    serializer = RowSerializer(table, cfg).fit(table.frame.iloc[:20])
    rows = np.arange(10, 30)
    ours = encode_rows(tok, serializer, table, table.frame.iloc[rows], 96)
    assert ours.prompt_ids == _encode(tok, serializer, table, rows, 96).prompt_ids
    with pytest.raises(ValueError, match="no rows"):
        encode_rows(tok, serializer, table, table.frame.iloc[:0], 96)
    assert len(encode_rows(tok, serializer, table, table.frame.iloc[:0], 96, allow_empty=True)) == 0  # empty split
    with pytest.raises(ValueError, match="lack column"):
        encode_rows(tok, serializer, table, table.frame.drop(columns="mean area"), 96)


# ----------------------------------------------------------------------------------- influence


@pytest.fixture(scope="module")
def influence_setup():
    """The tiny model with a random non-zero adapter, 24 rows to score and 16 validation rows."""
    model, tok = wrapped_tiny()
    params = set_trainable(model, "ab")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = DataConfig(source="breast-cancer", columns=COLUMNS, max_rows=60)
    table = load_table(cfg)
    serializer = RowSerializer(table, cfg).fit(table.frame)
    encoded = encode_rows(tok, serializer, table, table.frame, 96)
    return model, tok, params, table, encoded.subset(np.arange(24)), encoded.subset(np.arange(40, 56))


def _val_loss(model, val, pad_id) -> float:
    with torch.no_grad():
        pairs = [(val.prompt_ids[i], val.verbalizer_ids[val.labels[i]]) for i in range(len(val))]
        logp, count = target_logprobs(model, collate(pairs, pad_id, torch.device("cpu")))
        return float((-logp / count).mean())


def test_influence_fd_matches_exact_and_restores_model(influence_setup):
    model, tok, params, _, data, val = influence_setup
    pad = tok.pad_token_id
    before, adapter = base_snapshot(model), {k: v.detach().clone() for k, v in adapter_parameters(model).items()}
    params[0].requires_grad_(False)
    model.train()
    exact = influence_targets(model, params, data, val, pad, method="exact")
    fd = influence_targets(model, params, data, val, pad, batch_size=8)
    assert np.linalg.norm(fd - exact) / np.linalg.norm(exact) < 2e-3   # measured 4e-4
    assert np.abs(fd - exact).max() < 5e-3 * np.abs(exact).max()
    # Parameters bitwise restored; train mode and requires_grad flags too.
    assert_same_tensors(base_snapshot(model), before)
    assert_same_tensors({k: v.detach() for k, v in adapter_parameters(model).items()}, adapter)
    assert model.training and not params[0].requires_grad and params[1].requires_grad
    params[0].requires_grad_(True)
    model.eval()


def test_influence_sign_predicts_validation_gain(influence_setup):
    """One SGD step on the highest-influence row lowers L_val more than one on the lowest."""
    model, tok, params, _, data, val = influence_setup
    pad = tok.pad_token_id
    u = influence_targets(model, params, data, val, pad)
    base, lr, drops = _val_loss(model, val, pad), 0.02, {}
    for i in (int(np.argmax(u)), int(np.argmin(u))):
        saved = [p.detach().clone() for p in params]
        pair = [(data.prompt_ids[i], data.verbalizer_ids[data.labels[i]])]
        logp, count = target_logprobs(model, collate(pair, pad, torch.device("cpu")))
        grads = torch.autograd.grad((-logp / count).sum(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        drops[i] = base - _val_loss(model, val, pad)
        assert drops[i] == pytest.approx(lr * u[i], rel=0.1)   # first order: dL = -lr * u
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert drops[int(np.argmax(u))] > drops[int(np.argmin(u))]


def test_influence_zero_gradient_and_bad_input(influence_setup):
    _, tok, _, _, data, val = influence_setup
    model, _ = wrapped_tiny()                       # fresh adapter: B = 0, so d loss / d A = 0
    a_only = set_trainable(model, "a")
    np.testing.assert_array_equal(influence_targets(model, a_only, data, val, tok.pad_token_id), np.zeros(len(data)))
    with pytest.raises(ValueError, match="validation"):
        influence_targets(model, a_only, data, val.subset(np.arange(0)), tok.pad_token_id)
    with pytest.raises(ValueError, match="method"):
        influence_targets(model, a_only, data, val, tok.pad_token_id, method="jvp")


def test_fit_client_scorer_subset_and_warm_start(influence_setup):
    model, tok, params, table, data, val = influence_setup
    features = RowFeaturizer(table).transform(table.frame.iloc[:24])
    cfg = ScorerConfig(subset=8, epochs=20, hidden=8)
    first = fit_client_scorer(model, params, data, features, val, tok.pad_token_id, cfg, rng=np.random.default_rng(0))
    assert len(first.rows) == 8 and len(set(first.rows)) == 8 and np.isfinite(first.loss)
    np.testing.assert_allclose(first.targets, influence_targets(model, params, data.subset(first.rows), val,
                                                                tok.pad_token_id), rtol=1e-6)
    kept = first.scorer.to_tensors()
    second = fit_client_scorer(model, params, data, features, val, tok.pad_token_id, cfg, scorer=first.scorer,
                               rng=np.random.default_rng(1))
    assert second.scorer is not first.scorer
    assert_same_tensors(first.scorer.to_tensors(), kept)        # the previous scorer is left as it was
    w = sample_weights(second.scorer.score(features), cfg.temperature, cfg.weight_mode, floor=cfg.weight_floor)
    assert w.shape == (24,) and w.mean() == pytest.approx(1.0) and (w > 0).all()
    with pytest.raises(ValueError, match="one row per encoded row"):
        fit_client_scorer(model, params, data, features[:5], val, tok.pad_token_id, cfg)


@pytest.mark.parametrize("name, value", [("hidden", 0), ("weight_mode", "rank"), ("influence", "jvp"),
                                         ("temperature", 0.0), ("subset", 1), ("weight_floor", 2.0),
                                         ("fd_step", 0.0)])
def test_scorer_config_rejects_bad_values(name, value):
    with pytest.raises(ValueError, match=f"ScorerConfig: {name}"):
        ScorerConfig(**{name: value})
