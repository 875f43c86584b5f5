"""Split a table's rows across federated clients: IID, label skew, size skew, or by a column.

Order of operations, all driven by one ``numpy.random.default_rng(seed)``:

1. a stratified global test set (``data.global_test_fraction``) that no client ever trains on,
   so methods are compared on the same held-out rows;
2. the remaining rows are dealt to clients by ``partition.scheme``;
3. each client's rows are split into train / val / test (stratified when every class has at
   least two rows there), because in federated learning each institution evaluates locally too.

Dirichlet label skew follows Hsu et al. 2019 (arXiv:1909.06335): for every class c, client
shares p_c ~ Dir(alpha * 1_K); small alpha (0.1) gives clients dominated by one class, large alpha
(100) approaches IID. Every returned array holds sorted int64 row positions into ``table.frame``.

>>> from fedlora.config import DataConfig, PartitionConfig
>>> from fedlora.data.tables import load_table
>>> table = load_table(DataConfig(source="breast-cancer"))
>>> part = make_partition(table, PartitionConfig(scheme="iid", num_clients=3), DataConfig(), 0)
>>> len(part.clients), len(part.global_test)
(3, 114)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedlora.config import DataConfig, PartitionConfig
from fedlora.data.tables import DataError, Table

MAX_DRAWS = 100
"""Dirichlet re-draws before giving up; with feasible settings a valid draw comes within a few."""


@dataclass(eq=False)
class ClientData:
    client_id: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str = ""
    """Human-readable label: 'client 0', or the column value for scheme='column'."""

    @property
    def rows(self) -> np.ndarray:
        """All of this client's row positions (train, val and test together), sorted."""
        return np.sort(np.concatenate([self.train, self.val, self.test]))


@dataclass(eq=False)
class Partition:
    clients: list[ClientData]
    global_test: np.ndarray
    shifted_test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Rows above `data.shift_quantile` of `data.shift_column`: held out from every client."""


def _round(x: float) -> int:
    """Round half up: Python's round() is banker's rounding, surprising in split sizes."""
    return int(np.floor(x + 0.5))


def _take(idx: np.ndarray, y: np.ndarray, k: int, rng: np.random.Generator,
          stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick exactly k of `idx` (returns taken, rest); per-class counts by largest remainder."""
    idx = rng.permutation(idx)
    if k <= 0:
        return idx[:0], idx
    if not stratify:
        return idx[:k], idx[k:]
    labels = y[idx]
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts / len(idx)
    take = np.floor(quota).astype(int)
    # Hand the leftover rows to the classes with the largest fractional quota (ties: random).
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))
    take[order[: k - take.sum()]] += 1
    chosen = np.concatenate([idx[labels == c][:n] for c, n in zip(classes, take)])
    return chosen, np.setdiff1d(idx, chosen)


def _stratifiable(y: np.ndarray) -> bool:
    return len(y) > 0 and np.unique(y, return_counts=True)[1].min() >= 2


def _split_client(cid: int, rows: np.ndarray, y: np.ndarray, dcfg: DataConfig,
                  rng: np.random.Generator, name: str) -> ClientData:
    """Local train/val/test; the sizes are taken from the client's own row count."""
    n, strat = len(rows), _stratifiable(y[rows])
    n_test = _round(dcfg.test_fraction * n)
    n_val = min(_round(dcfg.val_fraction * n), n - n_test - 1)  # keep at least one train row
    test, rest = _take(rows, y, n_test, rng, strat)
    val, train = _take(rest, y, max(n_val, 0), rng, strat and _stratifiable(y[rest]))
    return ClientData(cid, np.sort(train), np.sort(val), np.sort(test), name)


def _iid(rows, y, pcfg, rng):
    return np.array_split(rng.permutation(rows), pcfg.num_clients)


def _dirichlet(rows, y, pcfg, rng):
    """Per-class Dirichlet shares, re-drawn until every client has at least min_rows rows."""
    k = pcfg.num_clients
    for _ in range(MAX_DRAWS):
        parts = [[] for _ in range(k)]
        for c in np.unique(y[rows]):
            members = rng.permutation(rows[y[rows] == c])
            cuts = (np.cumsum(rng.dirichlet(np.full(k, pcfg.alpha)))[:-1] * len(members))
            for i, chunk in enumerate(np.split(members, cuts.astype(int))):
                parts[i].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= pcfg.min_rows:
            return parts
    raise DataError(
        f"dirichlet partition: no draw in {MAX_DRAWS} gave all {k} clients at least "
        f"{pcfg.min_rows} rows with alpha={pcfg.alpha}; use a larger partition.alpha, fewer "
        "partition.num_clients, or a smaller partition.min_rows"
    )


def _quantity(rows, y, pcfg, rng):
    """Sizes = min_rows + a Dirichlet share of the rest, so the minimum holds without re-draws."""
    k = pcfg.num_clients
    extra = len(rows) - k * pcfg.min_rows
    share = rng.dirichlet(np.full(k, pcfg.alpha)) * extra
    sizes = np.floor(share).astype(int)
    sizes[np.argsort(-(share - sizes), kind="stable")[: extra - sizes.sum()]] += 1
    return np.split(rng.permutation(rows), np.cumsum(sizes + pcfg.min_rows)[:-1])


def _by_column(table: Table, rows: np.ndarray, pcfg: PartitionConfig):
    """One client per distinct value (sorted); missing values form their own '(missing)' client."""
    name = pcfg.column
    if name not in table.frame.columns:
        raise DataError(f"partition.column {name!r} not found; available columns: "
                        f"{', '.join(map(str, table.frame.columns))}")
    kinds = {c.name: c.kind for c in table.columns}
    if kinds.get(name) in ("numeric", "text"):
        raise DataError(f"partition.column {name!r} is {kinds[name]} with "
                        f"{table.frame[name].nunique()} distinct values; bin it into a few bands "
                        f"first (e.g. add a '{name}_band' column to your file) and split by that")
    values = table.frame[name].iloc[rows].map(lambda v: "(missing)" if pd.isna(v) else str(v))
    groups = sorted(values.unique())
    parts = [rows[(values == g).to_numpy()] for g in groups]
    small = [(g, len(p)) for g, p in zip(groups, parts) if len(p) < pcfg.min_rows]
    if small:
        raise DataError(f"partition.column {name!r}: value(s) {small} give clients with fewer than "
                        f"partition.min_rows={pcfg.min_rows} rows; merge rare values or lower "
                        "partition.min_rows")
    return parts, [f"{name}={g}" for g in groups]


_SCHEMES = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity}


def make_partition(table: Table, pcfg: PartitionConfig, dcfg: DataConfig, seed: int) -> Partition:
    """Global test split, then rows to clients by `pcfg.scheme`, then each client's local splits.

    With scheme='column' the number of clients is the number of distinct values and
    `pcfg.num_clients` is ignored.
    """
    rng = np.random.default_rng(seed)
    y = table.labels
    everything, shifted = _shift_split(table, dcfg)
    global_test, rows = _take(everything, y, _round(dcfg.global_test_fraction * len(y)), rng,
                              _stratifiable(y))
    rows = np.sort(rows)
    if pcfg.scheme == "column":
        parts, names = _by_column(table, rows, pcfg)
    elif pcfg.scheme in _SCHEMES:
        k = pcfg.num_clients
        if k < 1:
            raise DataError(f"partition.num_clients must be >= 1, got {k}")
        if len(rows) < k * pcfg.min_rows:
            raise DataError(
                f"{len(rows)} rows remain after the global test split, fewer than "
                f"num_clients x min_rows = {k} x {pcfg.min_rows}; use fewer "
                "partition.num_clients, a smaller partition.min_rows or "
                "data.global_test_fraction, or more rows"
            )
        parts = _SCHEMES[pcfg.scheme](rows, y, pcfg, rng)
        names = [f"client {i}" for i in range(k)]
    else:
        raise DataError(f"partition.scheme {pcfg.scheme!r} is not one of "
                        f"{sorted([*_SCHEMES, 'column'])}")
    clients = [_split_client(i, np.sort(p).astype(np.int64), y, dcfg, rng, name)
               for i, (p, name) in enumerate(zip(parts, names))]
    return Partition(clients, np.sort(global_test).astype(np.int64), shifted)


def _shift_split(table: Table, dcfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows for the federation, rows of the shifted test set) by `data.shift_column`."""
    everything = np.arange(len(table.frame), dtype=np.int64)
    name = dcfg.shift_column
    if name is None:
        return everything, everything[:0]
    kinds = {c.name: c.kind for c in table.columns}
    if kinds.get(name) != "numeric":
        raise DataError(f"data.shift_column {name!r} must be a numeric feature column; numeric ones: "
                        f"{[c for c, k in kinds.items() if k == 'numeric']}")
    if not 0 < dcfg.shift_quantile < 1:
        raise DataError(f"data.shift_quantile must be in (0, 1), got {dcfg.shift_quantile}")
    values = table.frame[name].to_numpy(dtype=float)
    cut = np.nanquantile(values, dcfg.shift_quantile)
    above = values > cut
    if not above.any() or above.all():
        raise DataError(f"data.shift_column {name!r} has no rows above its {dcfg.shift_quantile} quantile "
                        f"({cut:g}); pick another column or quantile")
    return everything[~above], everything[above]


def partition_summary(table: Table, partition: Partition):
    """A rich table: rows (train/val/test) and class mix per client, plus the global test set."""
    from rich.table import Table as RichTable

    y = table.labels
    out = RichTable(title=f"{table.name}: {len(partition.clients)} clients")
    for header in ["client", "train", "val", "test", *table.classes]:
        out.add_column(header, justify="left" if header == "client" else "right")

    def mix(rows: np.ndarray) -> list[str]:
        counts = np.bincount(y[rows], minlength=len(table.classes))
        total = max(len(rows), 1)
        return [f"{n} ({100 * n / total:.0f}%)" for n in counts]

    for c in partition.clients:
        out.add_row(c.name or f"client {c.client_id}", str(len(c.train)), str(len(c.val)),
                    str(len(c.test)), *mix(c.rows))
    gt = partition.global_test
    out.add_row("global test", "", "", str(len(gt)), *mix(gt), style="dim")
    return out
