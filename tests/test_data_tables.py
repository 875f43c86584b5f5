"""Loading, schema inference, cleaning and every DataError of fedlora.data.tables."""

import sys

import numpy as np
import pandas as pd
import pytest

from fedlora.config import DataConfig
from fedlora.data import DataError, Table, list_builtins, load_table
from fedlora.data.tables import infer_kind


def write_csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(source, **kw):
    return load_table(DataConfig(source=source, **kw))


# ----------------------------------------------------------------------------------- built-ins

def test_breast_cancer_known_answers():
    t = load("breast-cancer")
    assert isinstance(t, Table) and t.kind == "tabular" and t.domain == "healthcare"
    assert t.name == "breast-cancer" and t.target == "diagnosis"
    assert t.classes == ["benign", "malignant"]
    assert len(t.frame) == 569 and len(t.columns) == 30
    assert t.columns[0].name == "mean radius" and {c.kind for c in t.columns} == {"numeric"}
    assert t.frame["mean radius"].iloc[0] == pytest.approx(17.99)
    assert list(t.frame.columns) == [c.name for c in t.columns] + ["diagnosis"]
    assert isinstance(t.frame.index, pd.RangeIndex)
    assert t.labels.dtype == np.int64 and np.bincount(t.labels).tolist() == [357, 212]
    assert t.frame["diagnosis"].iloc[0] == "malignant" and t.labels[0] == 1


def test_german_credit_known_answers_and_alias():
    t = load("german_credit")
    assert t.name == "german-credit" and t.target == "creditability" and t.domain == "finance"
    assert len(t.frame) == 1000 and len(t.columns) == 20 and t.classes == ["bad", "good"]
    assert np.bincount(t.labels).tolist() == [300, 700]
    kinds = {c.name: c.kind for c in t.columns}
    assert kinds["foreign_worker"] == "boolean"
    assert kinds["duration_in_month"] == "numeric" and kinds["purpose"] == "categorical"
    assert t.frame["credit_amount"].iloc[0] == 1169
    assert "CC BY 4.0" in t.license


def test_list_builtins():
    info = {d["name"]: d for d in list_builtins()}
    assert set(info) == {"breast-cancer", "german-credit", "german-credit-qa", "wine", "penguins"}
    assert info["german-credit-qa"]["features"] == "generation" and info["german-credit-qa"]["rows"] == 1000
    assert info["german-credit-qa"]["classes"] == ["extract", "lookup", "summary"]  # its task families
    assert info["breast-cancer"]["rows"] == 569 and info["breast-cancer"]["features"] == 30
    assert info["german-credit"]["classes"] == ["bad", "good"]
    assert (info["wine"]["rows"], info["wine"]["features"]) == (178, 13)
    assert info["wine"]["classes"] == ["cultivar 1", "cultivar 2", "cultivar 3"]
    assert (info["penguins"]["rows"], info["penguins"]["features"]) == (344, 6)  # `year` dropped
    assert info["penguins"]["classes"] == ["Adelie", "Chinstrap", "Gentoo"] and "CC0" in info["penguins"]["license"]
    assert all(d["source"] and d["license"] for d in info.values())


def test_columns_select_and_reorder():
    t = load("breast-cancer", columns=["worst area", "mean radius"])
    assert [c.name for c in t.columns] == ["worst area", "mean radius"]
    assert list(t.frame.columns) == ["worst area", "mean radius", "diagnosis"]
    with pytest.raises(DataError, match="unknown column.*available columns: mean radius"):
        load("breast-cancer", columns=["mean radiu"])


def test_max_rows_stratified_and_seeded():
    cfg = DataConfig(source="german-credit", max_rows=100)
    a, b, c = load_table(cfg, seed=1), load_table(cfg, seed=1), load_table(cfg, seed=2)
    assert len(a.frame) == 100 and np.bincount(a.labels).tolist() == [30, 70]
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert not a.frame.equals(c.frame)


# ----------------------------------------------------------------------------- schema inference

@pytest.mark.parametrize("values, kind", [
    (["yes", "No", None], "boolean"),
    (["T", "f"], "boolean"),
    ([0, 1, 1], "boolean"),
    ([True, False], "boolean"),
    (["1", " 2.5", "-3e2"], "numeric"),
    ([1.5, 2.0, np.nan], "numeric"),
    ([1, 2, 3], "numeric"),
    (["a", "1", "b"], "categorical"),
    (["yes", "no", "maybe"], "categorical"),
])
def test_infer_kind(values, kind):
    assert infer_kind(pd.Series(values)) == kind


def test_csv_schema_conversion_missing_and_rare(tmp_path):
    rows = ["age,smoker,city,score,y"]
    for i in range(200):
        city = "rare" if i == 0 else ("a" if i % 2 else "b")
        age = "" if i == 1 else str(20 + i % 50)
        rows.append(f"{age},{'yes' if i % 3 else 'no'},{city},{i / 7:.3f},{'p' if i % 4 else 'q'}")
    t = load(write_csv(tmp_path, "\n".join(rows)), target="y", max_rare_fraction=0.01)
    assert [(c.name, c.kind) for c in t.columns] == [
        ("age", "numeric"), ("smoker", "boolean"), ("city", "categorical"), ("score", "numeric")]
    assert t.frame["age"].dtype == np.float64 and np.isnan(t.frame["age"].iloc[1])
    assert str(t.frame["smoker"].dtype) == "boolean"
    assert t.frame["smoker"].tolist()[:3] == [False, True, True]
    assert t.frame["city"].iloc[0] == "other" and set(t.frame["city"]) == {"a", "b", "other"}
    assert t.classes == ["p", "q"] and t.name == "data" and t.kind == "tabular"
    kept = load(write_csv(tmp_path, "\n".join(rows)), target="y", max_rare_fraction=0.0)
    assert kept.frame["city"].iloc[0] == "rare"


def test_numeric_classes_sort_as_numbers_and_float_labels_normalise(tmp_path):
    text = "x,y\n" + "\n".join(f"{i},{[2, 10, 1][i % 3]}.0" for i in range(9))
    assert load(write_csv(tmp_path, text), target="y").classes == ["1", "2", "10"]


def test_missing_target_rows_dropped_with_warning(tmp_path):
    text = "x,y\n1,a\n2,\n3,b\n4,\n5,a\n"
    with pytest.warns(UserWarning, match="dropped 2 row"):
        t = load(write_csv(tmp_path, text), target="y")
    assert t.frame["x"].tolist() == [1.0, 3.0, 5.0] and t.labels.tolist() == [0, 1, 0]


def test_jsonl_text_table(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "great film", "label": "pos"}\n\n{"text": "dull", "label": "neg"}\n',
                    encoding="utf-8")
    t = load(str(path))
    assert t.kind == "text" and t.target == "label" and t.name == "reviews"
    assert [(c.name, c.kind) for c in t.columns] == [("text", "text")]
    assert t.classes == ["neg", "pos"] and t.frame["text"].tolist() == ["great film", "dull"]


def test_parquet_roundtrip(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["a", "b", "a"]}).to_parquet(path)
    assert load(str(path), target="y").classes == ["a", "b"]


# -------------------------------------------------------------------------------------- errors

def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        load(str(path), target="y")


def test_file_not_found(tmp_path):
    with pytest.raises(DataError, match="not found.*breast-cancer"):
        load(str(tmp_path / "nope.csv"), target="y")


def test_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match="unsupported file extension '.xlsx'"):
        load(write_csv(tmp_path, "x,y\n1,a\n", "d.xlsx"), target="y")


@pytest.mark.parametrize("text, key", [("", "empty"), ("  \n", "empty"), ("x,y\n", "no rows")])
def test_empty_file_or_no_rows(tmp_path, text, key):
    with pytest.raises(DataError, match=key):
        load(write_csv(tmp_path, text), target="y")


def test_non_utf8_names_offset(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("x,y\ncafé,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid UTF-8.*byte offset 7.*re-save.*UTF-8"):
        load(str(path), target="y")


def test_duplicate_header(tmp_path):
    with pytest.raises(DataError, match=r"duplicate column.*\['x'\]"):
        load(write_csv(tmp_path, "x,x,y\n1,2,a\n"), target="y")


def test_missing_target_lists_columns(tmp_path):
    with pytest.raises(DataError, match="'label' not found; available columns: x, y"):
        load(write_csv(tmp_path, "x,y\n1,a\n"), target="label")


def test_no_target_given(tmp_path):
    with pytest.raises(DataError, match="--target"):
        load(write_csv(tmp_path, "x,y\n1,a\n2,b\n"))


def test_single_class(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        load(write_csv(tmp_path, "x,y\n1,a\n2,a\n"), target="y")


def test_entirely_empty_feature(tmp_path):
    with pytest.raises(DataError, match="'blank' is entirely empty.*data.columns"):
        load(write_csv(tmp_path, "x,blank,y\n1,,a\n2,,b\n"), target="y")


def test_too_many_classes(tmp_path):
    text = "x,y\n" + "\n".join(f"{i},c{i}" for i in range(21))
    with pytest.raises(DataError, match="at most 20 classes"):
        load(write_csv(tmp_path, text), target="y")


@pytest.mark.parametrize("second, key", [
    ("{not json", "line 3: not valid JSON"),
    ('{"text": "x"}', 'line 3: each line needs a "text" and a "label"'),
    ('["text", "label"]', "line 3"),
])
def test_jsonl_bad_lines(tmp_path, second, key):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "p"}\n\n' + second + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=key):
        load(str(path))


def test_malformed_csv(tmp_path):
    with pytest.raises(DataError, match="not a well-formed CSV"):
        load(write_csv(tmp_path, "x,y\n1,a\n1,2,3,4\n"), target="y")


def test_jsonl_text_not_string(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 3, "label": "p"}\n', encoding="utf-8")
    with pytest.raises(DataError, match='line 1: "text" must be a string'):
        load(str(path))


def test_bad_max_rows_and_no_features(tmp_path):
    with pytest.raises(DataError, match="max_rows must be >= 1"):
        load("breast-cancer", max_rows=0)
    with pytest.raises(DataError, match="no feature columns"):
        load("breast-cancer", columns=["diagnosis"])
