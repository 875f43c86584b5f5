"""Bad input seen in practice: truncated CSVs, directories, binaries under a .csv name, other delimiters."""

from __future__ import annotations

import gzip
import io
import warnings
import zipfile

import pandas as pd
import pytest

from fedlora.config import DataConfig
from fedlora.data import DataError, load_table

ROWS = "age,smoker,outcome\n" + "".join(f"{20 + i},{'yes' if i % 2 else 'no'},{'YES' if i % 3 else 'NO'}\n"
                                         for i in range(12))


def load(path, **kw):
    return load_table(DataConfig(source=str(path), target=kw.pop("target", "outcome"), **kw))


def test_truncated_last_row_prefix_of_class_is_refused(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text(ROWS + "22,no,N", encoding="utf-8")  # cut mid-row: 'N' is the start of 'NO'
    with pytest.raises(DataError, match=r"row 13 \(line 14.*'N'.*'NO'.*looks truncated"):
        load(path)


def test_unterminated_new_class_that_is_plausible_warns_and_loads(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text(ROWS + "22,no,MAYBE", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"row 13 .*'MAYBE', a class found in no other row"):
        table = load(path)
    assert table.classes == ["MAYBE", "NO", "YES"]


@pytest.mark.parametrize("last", ["22,no,N\n", "22,no,NO", "22,no,YES"])
def test_terminated_or_known_last_row_is_quiet(tmp_path, last):
    path = tmp_path / "ok.csv"
    path.write_text(ROWS + last, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = load(path)
    assert len(table.frame) == 13


def test_directory_as_source(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: is a directory; data.source must be one"):
        load(tmp_path)


def _parquet_bytes():
    pytest.importorskip("pyarrow")
    buf = io.BytesIO()
    pd.DataFrame({"a": [1, 2], "outcome": ["x", "y"]}).to_parquet(buf)
    return buf.getvalue()


def _xlsx_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("xl/workbook.xml", "<workbook/>")
    return buf.getvalue()


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("rows.csv", ROWS)
    return buf.getvalue()


@pytest.mark.parametrize("make, what, fix", [
    (_parquet_bytes, "a Parquet file", r"rename it to data\.parquet"),
    (lambda: gzip.compress(ROWS.encode()), "gzip-compressed", "gunzip data.csv"),
    (_xlsx_bytes, r"an Excel workbook \(\.xlsx\)", "CSV UTF-8"),
    (_zip_bytes, "a zip archive", "extract it"),
    (lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100), r"a legacy Excel/Office file \(\.xls\)", "CSV UTF-8"),
    (lambda: b"\x00\x01\x02binary\x00", r"a binary file \(it holds NUL bytes\)", "export the table as CSV"),
    (lambda: ROWS.encode("utf-16"), "UTF-16 text", "re-save it as UTF-8"),
])
def test_binary_under_csv_name_is_named(tmp_path, make, what, fix):
    path = tmp_path / "data.csv"
    path.write_bytes(make())
    with pytest.raises(DataError, match=rf"this is {what}, not \.csv text; .*{fix}"):
        load(path)


def test_parquet_renamed_back_loads(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(_parquet_bytes())
    assert load(path).classes == ["x", "y"]


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_other_delimiters_are_sniffed(tmp_path, sep):
    path = tmp_path / "data.csv"
    path.write_text(ROWS.replace(",", sep), encoding="utf-8")
    table = load(path)
    assert [c.name for c in table.columns] == ["age", "smoker"]
    assert [c.kind for c in table.columns] == ["numeric", "boolean"] and table.classes == ["NO", "YES"]


def test_semicolon_file_with_decimal_commas(tmp_path):
    path = tmp_path / "eu.csv"
    body = "".join(f"{i},5;{'a' if i % 2 else 'b'}\n" for i in range(10))
    path.write_text("dose;outcome\n" + body, encoding="utf-8")
    table = load(path)
    assert table.columns[0].kind == "numeric" and table.frame["dose"].iloc[3] == pytest.approx(3.5)


def test_one_column_file_says_so(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("age outcome\n1 a\n2 b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"only one column \('age outcome'\) with the comma delimiter.*semicolon, tab"):
        load(path)
