"""The tables of `fedlora datasets`, `fedlora models` and `fedlora methods`.

Two things a listing must never do, both seen before this module existed: cut the name a user
has to type (rich shrinks columns to the terminal and ellipsizes or wraps them), and put a value
under another column's header (columns were taken from the first row's key order and cells from
each row's own order, so a row that built its dict in another order, or lacked a key, shifted).

So columns are the union of all rows' keys in first-seen order and every cell is looked up by
key; the first column (the name) never wraps and is never narrower than its longest value;
number and yes/no columns never wrap either; only prose columns (descriptions, paths) fold.
On a terminal too narrow even for that, lines are not cropped: the terminal wraps them, and a
pipe gets them whole.

>>> rows = [{"name": "a", "n": 1}, {"n": 2, "name": "b", "note": "x"}]
>>> [c.header for c in rows_table(rows, "t").columns]
['name', 'n', 'note']
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def cell(value) -> str:
    """A value as shown: '-' for none, lists as 'a, b', everything else as str()."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _is_short(values: list) -> bool:
    """Numbers and booleans (or missing): a few characters that must not be split."""
    return all(v is None or isinstance(v, (bool, int, float)) for v in values)


def rows_table(rows: list[dict], title: str) -> Table:
    """A rich Table of `rows`, one column per key (first-seen order), cells by key."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for index, key in enumerate(keys):
        values = [row.get(key) for row in rows]
        if index == 0:
            table.add_column(key, no_wrap=True, min_width=max(len(cell(v)) for v in values))
        elif _is_short(values):
            table.add_column(key, no_wrap=True, justify="right")
        else:
            table.add_column(key, overflow="fold")
    for row in rows:
        table.add_row(*(cell(row.get(key)) for key in keys))
    return table


def narrowest(rows: list[dict]) -> int:
    """The width below which rich would squeeze some column to nothing: the name and the short
    columns whole, prose columns at least 2 characters, plus padding and borders (3 per column)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    width = 1
    for index, key in enumerate(keys):
        values = [cell(row.get(key)) for row in rows]
        whole = index == 0 or _is_short([row.get(key) for row in rows])
        width += 3 + (max(len(key), *map(len, values)) if whole else 2)
    return width


def print_rows(rows: list[dict], title: str, console: Console | None = None) -> None:
    """Print `rows` as a table (see the module docstring); too wide a table is not cropped."""
    console = console or Console()
    if not rows:
        console.print(f"{title}: none")
        return
    width = console.width
    console.width = max(width, narrowest(rows))  # print(width=) cannot exceed the console's own
    try:
        console.print(rows_table(rows, title), crop=False)
    finally:
        console.width = width
