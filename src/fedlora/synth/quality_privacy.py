"""Privacy of a synthetic table: distance to closest record, closer-to-train share, membership AUC.

All three use Gower distances (fedlora.synth.distance) over every scored column. The numeric
ranges come from train and holdout together in `closer_to_train_share` and `membership_auc`, so
both sides share a scale; `dcr` takes train's unless given others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from fedlora.data.tables import Table
from fedlora.synth.distance import closest_distance
from fedlora.synth.quality_inputs import _aligned


def _ranges(*frames: pd.DataFrame) -> dict[str, float]:
    numeric = pd.concat(frames, ignore_index=True).select_dtypes("float64")
    return (numeric.max() - numeric.min()).fillna(0.0).to_dict()


def _privacy_inputs(syn, train, holdout, table, seed):
    """Aligned syn; train and holdout subsampled (seeded) to n = min of their sizes; ranges of both."""
    syn, train, holdout = _aligned(table, synthetic=syn, train=train, holdout=holdout)
    rng, n = np.random.default_rng(seed), min(len(train), len(holdout))
    members, others = (f.iloc[np.sort(rng.choice(len(f), size=n, replace=False))] for f in (train, holdout))
    return syn, members, others, _ranges(train, holdout)


def dcr(syn: pd.DataFrame, train: pd.DataFrame, table: Table,
        ranges: dict[str, float] | None = None) -> dict:
    """Distance to closest record: d_i = min_j gower(syn_i, train_j) over all scored columns.

    Returns dcr_median, dcr_p5 (5th percentile) and exact_copies (share of d_i = 0; 0 ideal).
    Ranges default to train's. A small DCR alone is not copying on dense data: compare it with
    holdout rows' DCR to train (table_quality's dcr_real_median).
    """
    syn, train = _aligned(table, synthetic=syn, train=train)
    if len(syn) == 0:
        return dict(dcr_median=float("nan"), dcr_p5=float("nan"), exact_copies=float("nan"))
    d = closest_distance(syn, train, list(syn.columns), ranges or _ranges(train))
    return dict(dcr_median=float(np.median(d)), dcr_p5=float(np.percentile(d, 5)),
                exact_copies=float(np.mean(d <= 1e-12)))


def closer_to_train_share(syn: pd.DataFrame, train: pd.DataFrame, holdout: pd.DataFrame,
                          table: Table, seed: int | np.random.Generator = 0) -> float:
    """Share of syn rows with DCR(train) < DCR(holdout), ties counting half; about 0.5 is ideal.

    train and holdout are subsampled (seeded) to n = min(len(train), len(holdout)) rows each, so
    neither side is closer for being larger. A holdout smaller than train dilutes the signal (a
    copy of an unsampled train row is not closer). NaN if any frame is empty.
    """
    syn, members, others, ranges = _privacy_inputs(syn, train, holdout, table, seed)
    if len(syn) == 0 or len(members) == 0:
        return float("nan")
    d_train = closest_distance(syn, members, list(syn.columns), ranges)
    d_hold = closest_distance(syn, others, list(syn.columns), ranges)
    return float(np.mean((d_train < d_hold) + 0.5 * (d_train == d_hold)))


def membership_auc(syn: pd.DataFrame, train: pd.DataFrame, holdout: pd.DataFrame, table: Table,
                   seed: int | np.random.Generator = 0) -> float:
    """Distance-based membership inference AUC; 0.5 ideal, 1 = every train row is exposed.

    The attacker scores a real row r by -min_s gower(r, s) over synthetic rows s, and must tell
    n train rows (members) from n holdout rows (non-members), n = min(len(train), len(holdout)),
    both subsampled with `seed`; sklearn's roc_auc_score. NaN if any frame is empty.
    """
    syn, members, others, ranges = _privacy_inputs(syn, train, holdout, table, seed)
    if len(syn) == 0 or len(members) == 0:
        return float("nan")
    score = -closest_distance(pd.concat([members, others]), syn, list(syn.columns), ranges)
    n = len(members)
    return float(roc_auc_score(np.r_[np.ones(n), np.zeros(n)], score))
