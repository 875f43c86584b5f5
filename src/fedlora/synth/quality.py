"""Synthetic table quality: utility (TSTR), fidelity, associations and privacy, per client.

Concordia (arXiv 2605.09855) clients train on rows their own LLM table generator writes, so each
round we ask of a client's synthetic table `syn`: is it useful, faithful, or copied? Real frames
anchor the answers: `train` (rows the generator learned from), `holdout` (real rows it never
saw) and `test` (real rows to score classifiers on; may be the holdout). Every frame holds the
table's columns (features, then the target); extra columns are ignored, text columns skipped.

| key | metric | ideal |
|---|---|---|
| tstr_* / trtr_* | accuracy, macro-F1, AUROC on test of a classifier fit on syn / train | TSTR = TRTR |
| ratio_* | TSTR / TRTR | 1 |
| fidelity_mean | mean over columns of 1 - KS (numeric) or 1 - TV (other kinds) | 1 |
| correlation_gap | mean over column pairs of abs(A_syn - A_real), A an association | 0 |
| dcr_median, dcr_p5 | Gower distance of synthetic rows to their closest train row | ~ dcr_real_median |
| exact_copies | share of synthetic rows at DCR 0 | 0 |
| closer_to_train | share of syn rows closer to train than to an equal-size holdout sample | 0.5 |
| mia_auc | AUC of "member if close to a synthetic row", train vs holdout rows | 0.5 |

Our choices (the paper does not fix them): Gower distances (fedlora.synth.distance) over all
columns, target included, numeric ranges from train and holdout together so both sides share a
scale. `sdmetrics` (optional, not a dependency) can cross-check KS/TV complements and DCR.

The metric families live in `quality_utility.py` (TSTR), `quality_fidelity.py` and
`quality_privacy.py`, over the shared frame alignment of `quality_inputs.py`; this module
re-exports them and bundles them into `table_quality`.

>>> from fedlora.config import DataConfig
>>> from fedlora.data.tables import load_table
>>> table = load_table(DataConfig(source="breast-cancer"))
>>> real = table.frame  # a perfect "synthetic" copy: faithful, useful, and fully exposed
>>> column_fidelity(real, real, table)["mean radius"], correlation_gap(real, real, table)
(1.0, 0.0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedlora.data.tables import Table
from fedlora.synth.distance import closest_distance
from fedlora.synth.quality_fidelity import column_fidelity, correlation_gap
from fedlora.synth.quality_inputs import _aligned, _clean
from fedlora.synth.quality_privacy import _ranges, closer_to_train_share, dcr, membership_auc
from fedlora.synth.quality_utility import _SCORES, _classifier, tstr  # noqa: F401  (_classifier: re-exported)

# ------------------------------------------------------------------------------------- bundle

QUALITY_KEYS = (
    "rows", "syn_classes", "train_classes", "tstr_note",
    *(f"{p}_{k}" for p in ("tstr", "trtr", "ratio") for k in _SCORES),
    "fidelity_mean", "fidelity_min", "fidelity_worst", "correlation_gap",
    "dcr_median", "dcr_p5", "exact_copies", "dcr_real_median", "closer_to_train", "mia_auc",
)
"""The keys of every table_quality dict, in order (one row of quality.jsonl)."""


def table_quality(syn: pd.DataFrame, train: pd.DataFrame, holdout: pd.DataFrame,
                  test: pd.DataFrame, table: Table, seed: int = 0, model: str = "logistic") -> dict:
    """All metrics above as one flat JSON-able dict with the keys QUALITY_KEYS (NaN -> None).

    Fidelity and correlation_gap compare syn with train, the rows the generator imitates;
    fidelity_worst names the least faithful column; dcr_real_median is holdout rows' median DCR
    to train. An empty synthetic table gives rows 0, the TRTR baseline and None for the rest.
    """
    syn, train, holdout, test = _aligned(table, synthetic=syn, train=train, holdout=holdout, test=test)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"table_quality needs real rows: train has {len(train)}, test {len(test)}")
    out: dict = dict.fromkeys(QUALITY_KEYS)
    out.update(tstr(syn, train, test, table, seed, model), rows=len(syn))
    if len(syn) > 0:
        fid = column_fidelity(syn, train, table)
        ranges, cols = _ranges(train, holdout), list(syn.columns)
        out.update(fidelity_mean=float(np.mean(list(fid.values()))),
                   fidelity_min=min(fid.values()), fidelity_worst=min(fid, key=fid.get),
                   correlation_gap=correlation_gap(syn, train, table),
                   dcr_real_median=(float(np.median(closest_distance(holdout, train, cols, ranges)))
                                    if len(holdout) else None),
                   closer_to_train=closer_to_train_share(syn, train, holdout, table, seed),
                   mia_auc=membership_auc(syn, train, holdout, table, seed),
                   **dcr(syn, train, table, ranges))
    return {k: _clean(v) for k, v in out.items()}
