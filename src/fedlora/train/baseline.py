"""A classical baseline on the same client splits, as context for the LLM's numbers.

Each client fits scikit-learn's logistic regression (or histogram gradient boosting) on its own
training rows and is scored on its own test split, exactly as local-only LoRA is; a pooled model
on all clients' training rows is scored on the global test. Numeric columns are median-imputed
and standardized, categorical ones one-hot encoded; text tables use TF-IDF words.
"""

from __future__ import annotations

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedlora.data import Table
from fedlora.train.evaluate import classification_metrics


def _pipeline(table: Table, kind: str, seed: int):
    if table.kind == "text":
        features = TfidfVectorizer(min_df=1, max_features=20000)
        return make_pipeline(ColumnTransformer([("text", features, table.columns[0].name)]),
                             LogisticRegression(max_iter=2000))
    numeric = [c.name for c in table.columns if c.kind == "numeric"]
    other = [c.name for c in table.columns if c.kind != "numeric"]
    transforms = []
    if numeric:
        transforms.append(("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric))
    if other:
        transforms.append(("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="unknown"),
                                                OneHotEncoder(handle_unknown="ignore")), other))
    prep = ColumnTransformer(transforms, sparse_threshold=0.0)
    if kind == "gboost":
        return make_pipeline(prep, HistGradientBoostingClassifier(random_state=seed))
    return make_pipeline(prep, LogisticRegression(max_iter=2000))


def _features(table: Table, rows: np.ndarray):
    frame = table.frame.iloc[rows][[c.name for c in table.columns]].copy()
    for c in table.columns:
        if c.kind != "numeric":
            frame[c.name] = frame[c.name].astype(object).where(frame[c.name].notna(), "unknown").astype(str)
    return frame


def _fit_score(table: Table, kind: str, seed: int, train: np.ndarray, test: np.ndarray) -> dict | None:
    if len(test) == 0:
        return None
    labels = table.labels
    num_classes = len(table.classes)
    present = np.unique(labels[train])
    scores = np.full((len(test), num_classes), -np.inf)
    if len(present) == 1:
        # A client that saw one class can only predict it (logistic regression refuses to fit).
        scores[:, present[0]] = 0.0
    else:
        model = _pipeline(table, kind, seed).fit(_features(table, train), labels[train])
        proba = model.predict_proba(_features(table, test))
        scores[:, model.classes_] = np.log(np.clip(proba, 1e-12, None))
    return classification_metrics(scores, labels[test])


def classical_baseline(table: Table, train_rows: list[np.ndarray], test_rows: list[np.ndarray],
                       global_test: np.ndarray, kind: str = "logreg", seed: int = 0) -> list[dict]:
    """Rows shaped like the simulator's: one per client (local fit) and one 'global' (pooled fit).

    `train_rows[i]` / `test_rows[i]` are client i's row positions; pass the same (possibly
    capped) test rows the LLM is scored on, so the numbers compare like for like.
    """
    rows = []
    for cid, (train, test) in enumerate(zip(train_rows, test_rows)):
        metrics = _fit_score(table, kind, seed, train, test)
        if metrics is not None:
            rows.append({"client": cid, "split": "test", **metrics})
    metrics = _fit_score(table, kind, seed, np.concatenate(train_rows), global_test)
    if metrics is not None:
        rows.append({"client": "global", "split": "global_test", **metrics})
    return rows
