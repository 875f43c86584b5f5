"""Partitioning: coverage, determinism, skew statistics, local splits and errors."""

import numpy as np
import pandas as pd
import pytest
from rich.table import Table as RichTable

from fedlora.config import DataConfig, PartitionConfig
from fedlora.data import ColumnInfo, DataError, Table, make_partition, partition_summary

SCHEMES = ["iid", "dirichlet", "quantity"]
ALL = [(s, {}) for s in SCHEMES] + [("column", {"column": "region"})]


def synthetic(n=600, seed=0):
    """Three classes (50/30/20%), a categorical 'region' and a numeric 'age'."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.integers(20, 80, n).astype(float),
        "region": rng.choice(["east", "north", "west"], n, p=[0.5, 0.3, 0.2]).astype(object),
        "y": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]).astype(object),
    })
    cols = [ColumnInfo("age", "numeric"), ColumnInfo("region", "categorical")]
    return Table("synthetic", frame, "y", cols, ["a", "b", "c"], "tabular")


TABLE = synthetic()


def part(scheme="dirichlet", seed=0, dcfg=None, table=TABLE, **kw):
    return make_partition(table, PartitionConfig(scheme=scheme, **kw), dcfg or DataConfig(), seed)


def all_arrays(p):
    return [p.global_test] + [a for c in p.clients for a in (c.train, c.val, c.test)]


@pytest.mark.parametrize("scheme, kw", ALL)
def test_disjoint_cover_sorted_int64(scheme, kw):
    p = part(scheme, **kw)
    arrays = all_arrays(p)
    joined = np.concatenate(arrays)
    assert len(joined) == len(TABLE.frame) and set(joined) == set(range(len(TABLE.frame)))
    assert all(a.dtype == np.int64 and np.all(np.diff(a) > 0) for a in arrays)
    assert [c.client_id for c in p.clients] == list(range(len(p.clients)))


@pytest.mark.parametrize("scheme, kw", ALL)
def test_deterministic_in_seed(scheme, kw):
    a, b, c = part(scheme, 3, **kw), part(scheme, 3, **kw), part(scheme, 4, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(all_arrays(a), all_arrays(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(all_arrays(a), all_arrays(c)))


def test_global_test_is_stratified_and_optional():
    p = part("iid")
    assert len(p.global_test) == 120
    share = np.bincount(TABLE.labels[p.global_test], minlength=3) / 120
    overall = np.bincount(TABLE.labels, minlength=3) / len(TABLE.labels)
    assert np.abs(share - overall).max() < 0.01
    assert len(part("iid", dcfg=DataConfig(global_test_fraction=0.0)).global_test) == 0


def test_iid_equal_sizes_and_local_fractions():
    p = part("iid", num_clients=4)
    sizes = [len(c.rows) for c in p.clients]
    assert sizes == [120, 120, 120, 120]
    for c in p.clients:  # 120 rows: test round(0.2 * 120) = 24, val 12
        assert (len(c.train), len(c.val), len(c.test)) == (84, 12, 24)


def mean_max_share(p):
    """Average over clients of the largest class share: 1/3 is balanced, 1 is one class only."""
    return np.mean([np.bincount(TABLE.labels[c.rows], minlength=3).max() / len(c.rows)
                    for c in p.clients])


def test_dirichlet_small_alpha_more_skewed():
    small = np.mean([mean_max_share(part(alpha=0.1, seed=s, min_rows=5)) for s in range(5)])
    large = np.mean([mean_max_share(part(alpha=100.0, seed=s, min_rows=5)) for s in range(5)])
    assert small > 0.75 and large < 0.6 and small - large > 0.2


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_min_rows_respected(scheme):
    for seed in range(5):
        p = part(scheme, seed=seed, alpha=0.3, num_clients=6, min_rows=40)
        assert min(len(c.rows) for c in p.clients) >= 40


def test_quantity_small_alpha_more_size_spread():
    def spread(alpha):
        return np.mean([np.std([len(c.rows) for c in part("quantity", s, alpha=alpha).clients])
                        for s in range(5)])
    assert spread(0.1) > 3 * spread(100.0)


def test_column_scheme_sorted_values_num_clients_ignored():
    p = part("column", column="region", num_clients=7)
    assert [c.name for c in p.clients] == ["region=east", "region=north", "region=west"]
    for c, value in zip(p.clients, ["east", "north", "west"]):
        assert set(TABLE.frame["region"].iloc[c.rows]) == {value}


def test_summary_is_rich_table():
    p = part("dirichlet")
    out = partition_summary(TABLE, p)
    assert isinstance(out, RichTable) and out.row_count == len(p.clients) + 1
    assert [col.header for col in out.columns][-3:] == ["a", "b", "c"]


# -------------------------------------------------------------------------------------- errors

def test_too_few_rows():
    with pytest.raises(DataError, match="fewer than num_clients x min_rows"):
        part("iid", table=synthetic(50), num_clients=5, min_rows=10)


def test_dirichlet_gives_up_with_hint():
    with pytest.raises(DataError, match="larger partition.alpha"):
        part("dirichlet", alpha=0.01, num_clients=10, min_rows=45)


def test_column_errors():
    with pytest.raises(DataError, match="bin it"):
        part("column", column="age")
    with pytest.raises(DataError, match="not found; available columns: age, region, y"):
        part("column", column="city")
    with pytest.raises(DataError, match="min_rows"):
        part("column", column="region", min_rows=200)


def test_unknown_scheme():
    with pytest.raises(DataError, match="not one of"):
        part("random")
