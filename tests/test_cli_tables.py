"""`fedlora datasets` / `models` / `methods`: names are never cut and every value sits under its header.

The tables are read back from the printed text: a row starts where the name cell is non-empty,
and the fragments a folded cell spreads over several lines are joined again (spaces are dropped
on both sides, since rich breaks at a space or, folding, inside a word).
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedlora.cli import main
from fedlora.data import list_builtins
from fedlora.model import list_models
from fedlora.report.listing import cell, print_rows


def parse_table(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(headers, {name: {header: cell}}) of the one box-drawn rich table in `text`."""
    lines = text.splitlines()
    head = [line.strip().strip("┃").split("┃") for line in lines if line.startswith("┃")]
    headers = ["".join(part[i].strip() for part in head) for i in range(len(head[0]))]
    rows: list[list[list[str]]] = []
    for line in lines:
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        assert len(cells) == len(headers), line
        if cells[0]:
            rows.append([[c] for c in cells])
        else:
            for frags, c in zip(rows[-1], cells):
                frags.append(c)
    out = {}
    for frags in rows:
        joined = ["".join(f).replace(" ", "") for f in frags]
        out[frags[0][0]] = dict(zip(headers, joined))
    return headers, out


def check_listing(text: str, expected: list[dict]) -> None:
    headers, table = parse_table(text)
    assert headers == list(dict.fromkeys(k for row in expected for k in row))
    assert set(table) == {row["name"] for row in expected}  # each name whole, on one line
    for row in expected:
        for key in headers:
            assert table[row["name"]][key] == cell(row.get(key)).replace(" ", ""), (row["name"], key)


@pytest.mark.parametrize("columns", ["60", None])  # a narrow terminal; a pipe (rich's default 80)
@pytest.mark.parametrize("command", ["models", "datasets"])
def test_listings_keep_names_whole_and_values_in_their_columns(command, columns, capsys, monkeypatch):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main([command]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "\x1b[" not in out
    check_listing(out, list_models() if command == "models" else list_builtins())


def test_tiny_params_sit_under_params_not_where(capsys, monkeypatch):
    """The bug seen: tiny's dict had `where` before `params`, and cells were taken in dict order."""
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["models"]) == 0
    _, table = parse_table(capsys.readouterr().out)
    assert table["tiny"]["params"].isdigit() and table["tiny"]["where"] == "builtincode"


def test_rows_with_other_key_orders_and_missing_keys_and_a_long_name():
    long = "some-organisation/a-model-name-longer-than-the-terminal-is-wide"
    rows = [{"name": "a", "n": 1, "note": "first row"},
            {"note": "keys in another order", "name": "b", "n": 22},
            {"name": long, "n": None}]
    buf = io.StringIO()
    print_rows(rows, "t", Console(file=buf, width=40))
    text = buf.getvalue()
    assert long in text  # wider than the console: the line is not cropped
    check_listing(text, rows)
    _, table = parse_table(text)
    assert table[long]["note"] == "-" and table["b"]["n"] == "22"
