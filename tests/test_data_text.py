"""Row serialization: number formats, prompts, verbalizers, quantile bins fitted per client."""

import numpy as np
import pandas as pd
import pytest

from fedlora.config import DataConfig
from fedlora.data import ColumnInfo, DataError, RowSerializer, Table, load_table
from fedlora.data.text import bin_words, format_number


def small_table(classes=("no_default", "default")):
    frame = pd.DataFrame({
        "loan_amount": [1000.0, 2500.0, np.nan, 400.0],
        "rate": [0.0525, 12.345, 3.0, 7.5],
        "owns_home": pd.array([True, False, None, True], dtype="boolean"),
        "region": ["north", None, "south", "north"],
        "status": [classes[0], classes[1], classes[0], classes[1]],
    })
    columns = [ColumnInfo("loan_amount", "numeric"), ColumnInfo("rate", "numeric"),
               ColumnInfo("owns_home", "boolean"), ColumnInfo("region", "categorical")]
    return Table("loans", frame, "status", columns, sorted(classes), "tabular")


@pytest.mark.parametrize("value, digits, integer, expected", [
    (17.99, 2, False, "18"),
    (17.99, 3, False, "18"),
    (10.38, 3, False, "10.4"),
    (0.07871, 3, False, "0.0787"),
    (1169.0, 3, False, "1170"),
    (1169.0, 3, True, "1169"),
    (123456789.0, 3, False, "123000000"),
    (-2.5, 3, False, "-2.5"),
    (0.0, 3, False, "0"),
    (1e-9, 3, False, "1e-09"),
    (3e20, 2, False, "3e+20"),
])
def test_format_number(value, digits, integer, expected):
    assert format_number(value, digits, integer) == expected


def test_breast_cancer_prompt_known_answer():
    table = load_table(DataConfig(source="breast-cancer"))
    ser = RowSerializer(table, DataConfig(digits=3))
    prompt = ser.prompt(table.frame.iloc[0])
    assert prompt.startswith("mean radius is 18. mean texture is 10.4. mean perimeter is 123.")
    question = "\nQuestion: what is the diagnosis? Options: benign, malignant.\nAnswer:"
    assert prompt.endswith(question)
    assert ser.verbalizers == [" benign", " malignant"]
    assert len(ser.prompts(table.frame.iloc[:5])) == 5


def test_integer_column_printed_exactly():
    cfg = DataConfig(source="german-credit", columns=["credit_amount", "foreign_worker"])
    table = load_table(cfg)
    prompt = RowSerializer(table, DataConfig(digits=2)).prompt(table.frame.iloc[0])
    assert prompt.startswith("credit amount is 1169. foreign worker is yes.\n")


def test_booleans_missing_and_underscores():
    table = small_table()
    ser = RowSerializer(table, DataConfig(digits=3))
    assert ser.prompts(table.frame) == [
        "loan amount is 1000. rate is 0.0525. owns home is yes. region is north.\n"
        "Question: what is the status? Options: default, no default.\nAnswer:",
        "loan amount is 2500. rate is 12.3. owns home is no. region is unknown.\n"
        "Question: what is the status? Options: default, no default.\nAnswer:",
        "loan amount is unknown. rate is 3. owns home is unknown. region is south.\n"
        "Question: what is the status? Options: default, no default.\nAnswer:",
        "loan amount is 400. rate is 7.5. owns home is yes. region is north.\n"
        "Question: what is the status? Options: default, no default.\nAnswer:",
    ]
    assert ser.verbalizers == [" default", " no default"]


def test_verbalizers_must_stay_distinct():
    with pytest.raises(DataError, match="collide"):
        RowSerializer(small_table(classes=("a_b", "a b")), DataConfig())


def test_digits_fit_is_a_copy():
    table = small_table()
    ser = RowSerializer(table, DataConfig())
    fitted = ser.fit(table.frame.iloc[:2])
    assert fitted is not ser and fitted.prompts(table.frame) == ser.prompts(table.frame)


def test_quantile_bins_learned_from_fit_rows_only():
    frame = pd.DataFrame({"x": np.arange(100, dtype=float), "y": ["a", "b"] * 50})
    table = Table("t", frame, "y", [ColumnInfo("x", "numeric")], ["a", "b"], "tabular")
    ser = RowSerializer(table, DataConfig(number_format="quantile", quantile_bins=5))
    with pytest.raises(RuntimeError, match="fit"):
        ser.prompt(frame.iloc[0])
    fitted = ser.fit(frame)
    words = [fitted.prompt(frame.iloc[i]).split("\n")[0] for i in (0, 30, 50, 70, 99)]
    assert words == ["x is very low.", "x is low.", "x is medium.", "x is high.", "x is very high."]
    # Bins from the first half only: every row of the second half is above them all.
    first_half = ser.fit(frame.iloc[:50])
    assert first_half.prompt(frame.iloc[60]).startswith("x is very high.")
    assert ser._edges is None  # fit did not mutate the original


def test_quantile_ties_use_mid_rank():
    frame = pd.DataFrame({"x": [1.0] * 85 + [2.0] * 15, "y": ["a", "b"] * 50})
    table = Table("t", frame, "y", [ColumnInfo("x", "numeric")], ["a", "b"], "tabular")
    fitted = RowSerializer(table, DataConfig(number_format="quantile", quantile_bins=3)).fit(frame)
    assert fitted.prompt(frame.iloc[0]).startswith("x is medium.")
    assert fitted.prompt(frame.iloc[99]).startswith("x is high.")


def test_bin_words():
    assert bin_words(5) == ["very low", "low", "medium", "high", "very high"]
    assert bin_words(10)[0] == "band 1 of 10"
    with pytest.raises(DataError, match="quantile_bins"):
        bin_words(1)


def test_text_table_prompt(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "great film ", "label": "pos"}\n{"text": "dull", "label": "neg"}\n',
                    encoding="utf-8")
    table = load_table(DataConfig(source=str(path)))
    ser = RowSerializer(table, DataConfig())
    assert ser.prompt(table.frame.iloc[0]) == (
        "great film\nQuestion: what is the label? Options: neg, pos.\nAnswer:")


def test_bad_number_format():
    with pytest.raises(DataError, match="number_format"):
        RowSerializer(small_table(), DataConfig(number_format="words"))
