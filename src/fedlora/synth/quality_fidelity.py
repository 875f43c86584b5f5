"""Fidelity of a synthetic table: per-column marginals (`column_fidelity`) and pairwise associations
(`correlation_gap`) against real rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp
from scipy.stats.contingency import association

from fedlora.data.tables import Table
from fedlora.synth.quality_inputs import _MISSING, _aligned, _kinds


def _tv(a: pd.Series, b: pd.Series) -> float:
    p, q = (s.fillna(_MISSING).value_counts(normalize=True) for s in (a, b))
    return 0.5 * float(p.sub(q, fill_value=0).abs().sum())


def column_fidelity(syn: pd.DataFrame, real: pd.DataFrame, table: Table) -> dict[str, float]:
    """Per-column marginal similarity in [0, 1] (1 ideal), target included.

    numeric: 1 - KS, KS = sup_x |F_syn(x) - F_real(x)| over non-missing values (scipy ks_2samp;
    0 if syn has none; missing rates are not compared - our choice); other kinds: 1 - TV,
    TV = 0.5 * sum_v |p_syn(v) - p_real(v)| with missing as a value. Summary: the plain mean.
    """
    syn, real = _aligned(table, synthetic=syn, real=real)
    if len(syn) == 0 or len(real) == 0:
        raise ValueError("column_fidelity needs at least one synthetic and one real row")
    out = {}
    for col, kind in _kinds(table).items():
        if kind == "numeric":
            x, y = syn[col].dropna(), real[col].dropna()
            out[col] = 1.0 - float(ks_2samp(x, y, method="asymp").statistic) if len(x) and len(y) else 0.0
        else:
            out[col] = 1.0 - _tv(syn[col], real[col])
    return out


def _eta(cat: pd.Series, num: pd.Series) -> float:
    """Correlation ratio sqrt(sum_k n_k (mean_k - mean)^2 / sum_i (x_i - mean)^2), in [0, 1]."""
    keep = num.notna()
    x, groups = num[keep], cat[keep].fillna(_MISSING)
    total = float(((x - x.mean()) ** 2).sum())
    if total <= 0:
        return 0.0
    stats = x.groupby(groups).agg(["count", "mean"])
    return math.sqrt(float((stats["count"] * (stats["mean"] - x.mean()) ** 2).sum()) / total)


def _associations(frame: pd.DataFrame, kinds: dict[str, str]) -> np.ndarray:
    """Upper-triangle associations of every column pair (see correlation_gap)."""
    cols = list(kinds)
    numeric = [c for c in cols if kinds[c] == "numeric"]
    pearson = frame[numeric].corr(method="pearson").fillna(0.0)  # constant column -> 0
    out = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            if a in pearson.index and b in pearson.index:
                out.append(pearson.at[a, b])
            elif a in pearson.index or b in pearson.index:
                num, cat = (a, b) if a in pearson.index else (b, a)
                out.append(_eta(frame[cat], frame[num]))
            else:
                observed = pd.crosstab(frame[a].fillna(_MISSING), frame[b].fillna(_MISSING)).to_numpy()
                out.append(association(observed, method="cramer") if min(observed.shape) > 1 else 0.0)
    return np.asarray(out, dtype=float)


def correlation_gap(syn: pd.DataFrame, real: pd.DataFrame, table: Table) -> float:
    """Mean over column pairs (target included) of |A_syn(a, b) - A_real(a, b)|; 0 ideal.

    Our choice of association A: Pearson r (in [-1, 1], pairwise-complete rows) for two numeric
    columns; the correlation ratio eta (in [0, 1]) for a numeric and a non-numeric column;
    Cramer's V without bias correction (in [0, 1]) for two non-numeric columns, missing counted
    as a value. A pair involving a constant column has association 0. The gap lies in [0, 2].
    """
    syn, real = _aligned(table, synthetic=syn, real=real)
    kinds = _kinds(table)
    if len(kinds) < 2 or len(syn) < 2 or len(real) < 2:
        return float("nan")
    return float(np.mean(np.abs(_associations(syn, kinds) - _associations(real, kinds))))
