"""Utility of a synthetic table: Train-on-Synthetic-Test-on-Real against Train-on-Real (`tstr`)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedlora.data.tables import Table
from fedlora.synth.quality_inputs import _MISSING, _aligned, _kinds

_SCORES = ("accuracy", "macro_f1", "auroc")


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
