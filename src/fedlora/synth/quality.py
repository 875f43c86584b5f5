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

>>> from fedlora.config import DataConfig
>>> from fedlora.data.tables import load_table
>>> table = load_table(DataConfig(source="breast-cancer"))
>>> real = table.frame  # a perfect "synthetic" copy: faithful, useful, and fully exposed
>>> column_fidelity(real, real, table)["mean radius"], correlation_gap(real, real, table)
(1.0, 0.0)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp
from scipy.stats.contingency import association
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedlora.data.tables import Table
from fedlora.synth.distance import closest_distance

_MISSING = "(missing)"
_SCORES = ("accuracy", "macro_f1", "auroc")
_TRUE = {"true", "yes", "1", "t", "y", "1.0"}  # as fedlora.data.tables reads booleans


# ------------------------------------------------------------------------------------- inputs

def _kinds(table: Table) -> dict[str, str]:
    """Column -> kind for every scored column: features except text, then the target."""
    kinds = {c.name: c.kind for c in table.columns if c.kind != "text"}
    if not kinds:
        raise ValueError(f"table {table.name!r} has only text features; quality metrics need tabular ones")
    return {**kinds, table.target: "target"}


def _label(value) -> str | None:
    """A category or class name as the table writes it: 1.0 -> '1', missing -> None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    integral = isinstance(value, (float, np.floating)) and float(value).is_integer()
    return str(int(value)) if integral else str(value).strip()


def _align(frame: pd.DataFrame, table: Table, name: str) -> pd.DataFrame:
    """Scored columns in order: numeric as float64, other kinds as objects, None = missing.

    One representation for real and generated rows, so that "5" equals 5.0 and "True" equals True.
    """
    kinds = _kinds(table)
    missing = [c for c in kinds if c not in frame.columns]
    if missing and len(frame) == 0:  # a generator that wrote nothing: no columns to check
        return pd.DataFrame({c: pd.Series(dtype=float if k == "numeric" else object)
                             for c, k in kinds.items()})
    if missing:
        extra = [c for c in frame.columns if c not in kinds]
        raise ValueError(f"{name} rows lack column(s) {missing} of table {table.name!r}"
                         + (f"; unexpected column(s) {extra} - renamed?" if extra else ""))
    out = {}
    for col, kind in kinds.items():
        s = frame[col]
        if kind == "numeric":
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif kind == "boolean":
            out[col] = s.map(lambda v: None if pd.isna(v) else str(v).strip().lower() in _TRUE).astype(object)
        else:
            out[col] = s.map(_label).astype(object)
    return pd.DataFrame(out).reset_index(drop=True)


def _aligned(table: Table, **frames: pd.DataFrame) -> list[pd.DataFrame]:
    return [_align(frame, table, name) for name, frame in frames.items()]


def _clean(value):
    """JSON-able: numpy scalars -> Python, NaN/inf -> None."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ------------------------------------------------------------------------------------ utility

def _classifier(table: Table, model: str, seed: int) -> Pipeline:
    numeric = [c for c, k in _kinds(table).items() if k == "numeric"]
    other = [c for c, k in _kinds(table).items() if k in ("categorical", "boolean")]
    prep = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                              StandardScaler()), numeric),
        ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), other),
    ])
    heads = dict(logistic=lambda: LogisticRegression(max_iter=2000),
                 hgb=lambda: HistGradientBoostingClassifier(random_state=seed))
    if model not in heads:
        raise ValueError(f"unknown TSTR model {model!r}; use 'logistic' or 'hgb'")
    return Pipeline([("prep", prep), ("model", heads[model]())])


def _fit_score(fit: pd.DataFrame, test: pd.DataFrame, table: Table, model: str, seed: int) -> dict:
    """Accuracy, macro-F1 and AUROC on `test` of a classifier fit on `fit` (see tstr)."""
    features = [c for c in _kinds(table) if c != table.target]
    # one-hot wants one type per column: booleans and missing values become strings
    X_fit, X_test = (f[features].apply(lambda s: s if s.dtype == "float64" else
                                       s.fillna(_MISSING).astype(str)) for f in (fit, test))
    y_fit, y_test = fit[table.target].to_numpy(), test[table.target].to_numpy()
    seen = np.unique(y_fit)
    proba = np.zeros((len(test), len(table.classes)))
    if len(seen) == 1:
        pred = np.full(len(test), seen[0], dtype=object)
        proba[:, table.classes.index(seen[0])] = 1.0
    else:
        clf = _classifier(table, model, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X_fit, y_fit)
        pred = clf.predict(X_test)
        proba[:, [table.classes.index(c) for c in clf.classes_]] = clf.predict_proba(X_test)
    aucs = [roc_auc_score(y_test == c, proba[:, k]) for k, c in enumerate(table.classes)
            if 0 < (y_test == c).sum() < len(y_test)]
    return dict(accuracy=accuracy_score(y_test, pred),
                macro_f1=f1_score(y_test, pred, average="macro", zero_division=0),
                auroc=float(np.mean(aucs)) if aucs else float("nan"))


def tstr(syn: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame, table: Table,
         seed: int = 0, model: str = "logistic") -> dict:
    """Train-on-Synthetic-Test-on-Real against Train-on-Real-Test-on-Real.

    Keys tstr_/trtr_ + accuracy, macro_f1 (sklearn, over the labels present) and auroc (mean over
    classes c with positives and negatives in test of AUC(y == c, p_c): binary AUROC for two
    classes, macro one-vs-rest beyond); ratio_* = TSTR / TRTR (ideal 1); syn_classes and
    train_classes; tstr_note (None, or why TSTR is degenerate). Our classifier: median-impute and
    standardize numeric columns, one-hot the rest (missing as a value), then LogisticRegression
    ("logistic") or HistGradientBoostingClassifier ("hgb"). Fit rows with a single class give
    that constant predictor (AUROC 0.5), as any classifier would; synthetic rows whose label is
    not one of `table.classes` are dropped.
    """
    syn, train, test = _aligned(table, synthetic=syn, train=train, test=test)
    rows, syn = len(syn), syn[syn[table.target].isin(table.classes)]
    out: dict = dict(syn_classes=int(syn[table.target].nunique()),
                     train_classes=int(train[table.target].nunique()), tstr_note=None)
    trtr = _fit_score(train, test, table, model, seed)
    if len(syn) == 0:
        out["tstr_note"] = ("the synthetic table is empty" if rows == 0 else
                            f"none of the {rows} synthetic rows has a label in {table.classes}")
        res = dict.fromkeys(_SCORES, float("nan"))
    else:
        if out["syn_classes"] == 1:
            out["tstr_note"] = (f"synthetic rows hold one class ({syn[table.target].iloc[0]!r}): "
                                "TSTR is that constant predictor")
        res = _fit_score(syn, test, table, model, seed)
    for key in _SCORES:
        out[f"tstr_{key}"], out[f"trtr_{key}"] = res[key], trtr[key]
        out[f"ratio_{key}"] = res[key] / trtr[key] if trtr[key] > 0 else float("nan")
    return out


# ----------------------------------------------------------------------------------- fidelity

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


# ------------------------------------------------------------------------------------ privacy

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
