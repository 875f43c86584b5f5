"""Synthetic table quality metrics: known answers, limit cases, statistical checks, the plot."""

import doctest
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fedlora.config import DataConfig
from fedlora.data.tables import ColumnInfo, Table, load_table
from fedlora.synth import quality
from fedlora.synth.quality import (QUALITY_KEYS, closer_to_train_share, column_fidelity,
                                   correlation_gap, dcr, membership_auc, table_quality, tstr)
from fedlora.synth.quality_plots import plot_quality

# every key that needs a synthetic row (TRTR, train_classes and the note do not)
SYN_DEPENDENT = [k for k in QUALITY_KEYS if not k.startswith("trtr_")
                 and k not in ("rows", "syn_classes", "train_classes", "tstr_note")]


def three_way(source: str, seed: int = 0, **kw):
    """The table and a seeded split of its rows into three equal, disjoint parts."""
    table = load_table(DataConfig(source=source, **kw))
    idx = np.random.default_rng(seed).permutation(len(table.frame))
    k = len(idx) // 3
    return (table, *(table.frame.iloc[idx[i * k:(i + 1) * k]].reset_index(drop=True) for i in range(3)))


@pytest.fixture(scope="module")
def credit():
    return three_way("german-credit")


@pytest.fixture(scope="module")
def cancer():
    return three_way("breast-cancer")


def tiny_table(frame: pd.DataFrame, kinds: dict[str, str], classes: list[str]) -> Table:
    return Table("tiny", frame, "y", [ColumnInfo(c, k) for c, k in kinds.items()], classes, "tabular")


def test_module_docstring_example_runs():
    assert doctest.testmod(quality).failed == 0


# ----------------------------------------------------------------------------- known answers

def test_fidelity_by_hand():
    # x: syn {1,2,3,4} vs real {3,4,5,6}: F_syn(2) = 1/2, F_real(2) = 0, so KS = 1/2.
    # y: syn {a: 1/2, b: 1/2} vs real {a: 1/4, b: 1/2, c: 1/4}: TV = (1/4 + 0 + 1/4) / 2 = 1/4.
    real = pd.DataFrame({"x": [3.0, 4, 5, 6], "y": ["a", "b", "b", "c"]})
    syn = pd.DataFrame({"x": [1.0, 2, 3, 4], "y": ["a", "a", "b", "b"]})
    table = tiny_table(real, {"x": "numeric"}, ["a", "b", "c"])
    assert column_fidelity(syn, real, table) == pytest.approx({"x": 0.5, "y": 0.75})


def test_fidelity_counts_missing_as_a_category_and_parses_text():
    # flag: syn {True: 1/2, missing: 1/2} vs real {True: 1/2, False: 1/2}: TV = 1/2
    real = pd.DataFrame({"x": [1.0, 2.0], "flag": [True, False], "y": ["a", "b"]})
    syn = pd.DataFrame({"x": ["1", "2.0"], "flag": ["true", None], "y": ["a", "b"]})  # as an LLM writes
    table = tiny_table(real, {"x": "numeric", "flag": "boolean"}, ["a", "b"])
    assert column_fidelity(syn, real, table) == pytest.approx({"x": 1.0, "flag": 0.5, "y": 1.0})


def test_correlation_gap_pearson_by_hand():
    # A(x, w): +1 in syn, -1 in real; the constant target has association 0 with both.
    # Pairs (x, w), (x, y), (w, y): gap = (2 + 0 + 0) / 3.
    x = [0.0, 1, 2, 3]
    syn = pd.DataFrame({"x": x, "w": x, "y": ["a"] * 4})
    real = pd.DataFrame({"x": x, "w": [-v for v in x], "y": ["a"] * 4})
    table = tiny_table(real, {"x": "numeric", "w": "numeric"}, ["a", "b"])
    assert correlation_gap(syn, real, table) == pytest.approx(2 / 3)


def test_correlation_gap_eta_and_cramers_v_by_hand():
    # syn: x, c and y all say the same thing (eta = 1, V = 1); real: balanced design (eta = V = 0).
    syn = pd.DataFrame({"x": [0.0, 0, 1, 1], "c": ["u", "u", "v", "v"], "y": ["a", "a", "b", "b"]})
    real = pd.DataFrame({"x": [0.0, 1, 0, 1], "c": ["u", "u", "v", "v"], "y": ["a", "b", "b", "a"]})
    table = tiny_table(real, {"x": "numeric", "c": "categorical"}, ["a", "b"])
    assert correlation_gap(syn, real, table) == pytest.approx(1.0)
    assert correlation_gap(real, real, table) == 0.0


def test_multiclass_auroc_matches_sklearn_ovr():
    table, a, b, _ = three_way("german-credit", target="housing")  # 3 classes
    out = tstr(a, a, b, table, seed=0)
    clf = quality._classifier(table, "logistic", 0)
    features = [c.name for c in table.columns]
    prep = lambda f: f[features].apply(lambda s: s if s.dtype == "float64" else s.astype(str))  # noqa: E731
    clf.fit(prep(a), a[table.target])
    proba = clf.predict_proba(prep(b))
    ref = roc_auc_score(b[table.target], proba, multi_class="ovr", average="macro", labels=clf.classes_)
    assert out["trtr_auroc"] == pytest.approx(ref, abs=1e-12)
    assert out["tstr_auroc"] == out["trtr_auroc"] and out["ratio_auroc"] == 1.0


# ------------------------------------------------------------------------------ limit cases

def test_copied_train_is_flagged(credit):
    table, train, holdout, test = credit
    q = table_quality(train, train, holdout, test, table, seed=0)
    assert q["rows"] == len(train) and q["fidelity_mean"] == 1.0 and q["fidelity_min"] == 1.0
    assert q["correlation_gap"] == pytest.approx(0.0, abs=1e-12)
    assert q["exact_copies"] == 1.0 and q["dcr_median"] == 0.0 and q["dcr_p5"] == 0.0
    assert q["closer_to_train"] > 0.95  # every copy is at distance 0 from train, > 0 from holdout
    assert q["mia_auc"] > 0.95  # memorization detected
    assert q["tstr_accuracy"] == q["trtr_accuracy"] and q["ratio_accuracy"] == 1.0


@pytest.mark.parametrize("source", ["german-credit", "breast-cancer"])
def test_independent_sample_looks_private(source):
    # syn, train and holdout are disjoint thirds of one real table: nothing was memorized.
    # Over 30 random splits the standard deviation was 0.026 (german-credit) / 0.034
    # (breast-cancer) for closer_to_train and 0.022 / 0.026 for mia_auc, with means 0.50;
    # 0.12 is over 3.5 standard deviations, and the split seed is fixed.
    table, train, holdout, syn = three_way(source, seed=0)
    assert closer_to_train_share(syn, train, holdout, table, seed=0) == pytest.approx(0.5, abs=0.12)
    assert membership_auc(syn, train, holdout, table, seed=0) == pytest.approx(0.5, abs=0.12)
    assert dcr(syn, train, table)["exact_copies"] == 0.0


def test_shuffled_columns_keep_marginals_but_lose_structure(cancer):
    table, train, holdout, real_syn = cancer
    rng = np.random.default_rng(0)
    shuffled = pd.DataFrame({c: train[c].to_numpy()[rng.permutation(len(train))] for c in train})
    fid = column_fidelity(shuffled, train, table)
    assert min(fid.values()) == 1.0  # a permutation keeps every marginal exactly
    real_gap, shuffled_gap = correlation_gap(real_syn, train, table), correlation_gap(shuffled, train, table)
    assert real_gap < 0.15 and shuffled_gap > real_gap + 0.2  # measured 0.07 vs 0.39
    real_acc = tstr(real_syn, train, holdout, table)["tstr_accuracy"]
    shuffled_acc = tstr(shuffled, train, holdout, table)["tstr_accuracy"]
    assert real_acc > 0.9 and shuffled_acc < real_acc - 0.2  # measured 0.98 vs 0.50


def test_single_class_synthetic_table(cancer):
    table, train, holdout, test = cancer
    syn = train[train[table.target] == "benign"]
    q = table_quality(syn, train, holdout, test, table, seed=0)
    assert q["syn_classes"] == 1 and "one class ('benign')" in q["tstr_note"]
    assert q["tstr_auroc"] == 0.5  # a constant score
    assert q["tstr_accuracy"] == pytest.approx((test[table.target] == "benign").mean())
    assert q["fidelity_worst"] == table.target and q["exact_copies"] == 1.0


@pytest.mark.parametrize("empty", [pd.DataFrame(), "no rows"])
def test_empty_synthetic_table(credit, empty):
    table, train, holdout, test = credit
    syn = train.iloc[:0] if isinstance(empty, str) else empty
    q = table_quality(syn, train, holdout, test, table, seed=0)
    assert list(q) == list(QUALITY_KEYS) and q["rows"] == 0 and "empty" in q["tstr_note"]
    assert q["syn_classes"] == 0 and all(q[k] is None for k in SYN_DEPENDENT)
    assert q["trtr_accuracy"] > 0.6  # the real baseline is still reported
    json.dumps(q, allow_nan=False)


def test_missing_columns_raise_naming_them(credit):
    table, train, holdout, test = credit
    syn = train.drop(columns=["purpose", table.target]).rename(columns={"housing": "Housing"})
    with pytest.raises(ValueError, match=r"synthetic rows lack column\(s\) \['purpose', 'housing', "
                                         r"'creditability'\].*unexpected column\(s\) \['Housing'\]"):
        table_quality(syn, train, holdout, test, table)
    with pytest.raises(ValueError, match=r"holdout rows lack column\(s\) \['purpose'\]"):
        membership_auc(train, train, holdout.drop(columns="purpose"), table)


def test_text_typed_synthetic_rows_match_typed_ones(credit):
    # a generator's parser may leave every cell a string: "6.0", "True"; metrics must not care
    table, train, holdout, test = credit
    typed = table_quality(holdout, train, holdout, test, table, seed=1)
    text = table_quality(holdout.astype(str), train, holdout, test, table, seed=1)
    assert text == typed


def test_quality_row_is_flat_json_and_hgb_option_works(credit):
    table, train, holdout, test = credit
    q = table_quality(holdout, train, holdout, test, table, seed=0, model="hgb")
    assert list(q) == list(QUALITY_KEYS) and q["tstr_note"] is None
    assert all(v is None or isinstance(v, (int, float, str)) for v in q.values())
    assert json.loads(json.dumps(q, allow_nan=False)) == q
    assert 0.5 < q["tstr_auroc"] <= 1 and 0 < q["ratio_accuracy"] < 1.5
    assert 0 < q["dcr_median"] < 1 and q["exact_copies"] == 0.0
    with pytest.raises(ValueError, match="unknown TSTR model 'svm'"):
        tstr(holdout, train, test, table, model="svm")


# ------------------------------------------------------------------------------------- plot

def test_plot_quality_writes_png(tmp_path):
    rows = [dict(client=c, round=r, fidelity_mean=0.8 + 0.05 * r, ratio_accuracy=0.9,
                 mia_auc=0.5 + 0.01 * c, dcr_median=0.2, dcr_real_median=0.18)
            for c in range(3) for r in range(3)]
    rows.append(dict(client=0, round=3, **dict.fromkeys(QUALITY_KEYS)))  # an empty table: a gap
    path = plot_quality(rows, tmp_path / "sub" / "quality.png", title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="'client' and a 'round'"):
        plot_quality([{"round": 0}], tmp_path / "x.png")
