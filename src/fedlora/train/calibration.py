"""Calibrated decisions from label log-likelihoods: what is fitted, on what, and the metrics.

Label-likelihood scoring (train/evaluate.py) takes argmax_c s_c with s_c = log p(v_c | x). The
scores carry the model's prior for each label word, so a model that ranks well can still predict
the majority (or the most likely-sounding) class everywhere. A calibration maps the [n, C] scores to

    z = scale * (s + offset) + bias                      (softmax(z) are the calibrated probabilities)

and decides argmax_c z_c. Fits (eval.calibration):

- 'contextual' (Zhao et al., arXiv 2101.09690): p_cf = the mean over content-free prompts of
  softmax(s_cf); offset = -log p_cf, scale = 1, bias = 0. This is the paper's W = diag(p_cf)^-1
  applied in probability space: softmax(s - log p_cf) = normalize(p / p_cf). No labels needed.
- 'bias': scale a >= 0 (an inverse temperature) and per-class bias b fitted on labelled
  calibration scores (a client's own validation split) by minimizing
      sum_i -log softmax(a s_i + b)_{y_i}  +  l2 / 2 * (||b||^2 + (a - 1)^2),
  a convex problem (L-BFGS-B, analytic gradient). The penalty (l2 = 1, worth about one example)
  pulls toward the identity and keeps b finite when a small validation split holds one class.
  For C = 2 this is Platt scaling of s_1 - s_0 with a slight shrinkage.
- 'both': the contextual offset first, then 'bias' fitted on the offset scores.
- 'none': the identity.

A fit receives only calibration data (validation scores and labels, content-free scores); test
scores are only ever passed to `Calibration.apply`. With a > 0 the map is monotone in s_1 - s_0,
so binary AUROC is unchanged; multi-class one-vs-rest AUROC may move with the bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from fedlora.config.validate import CALIBRATIONS
from fedlora.train.evaluate import classification_metrics

ECE_BINS = 10
"""Equal-width confidence bins of the expected calibration error."""


@dataclass(frozen=True)
class Calibration:
    """z = scale * (scores + offset) + bias, per class; the identity by default."""

    offset: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: float = 1.0
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated log-scores (argmax = the calibrated decision); an empty offset/bias is 0."""
        scores = np.asarray(scores, dtype=float)
        offset = self.offset if self.offset.size else 0.0
        bias = self.bias if self.bias.size else 0.0
        return self.scale * (scores + offset) + bias


def fit_contextual(content_free_scores: np.ndarray) -> Calibration:
    """offset = -log p_cf, p_cf = mean over content-free prompts of softmax over the classes."""
    p_cf = softmax(np.asarray(content_free_scores, dtype=float), axis=1).mean(axis=0)
    return Calibration(offset=-np.log(np.clip(p_cf, 1e-12, None)))


def fit_bias(scores: np.ndarray, labels: np.ndarray, start: Calibration | None = None,
             l2: float = 1.0) -> Calibration:
    """Scale a >= 0 and bias b minimizing the penalized NLL above, on top of `start`'s offset.

    >>> cal = fit_bias(np.zeros((4, 2)), np.array([0, 1, 1, 1]), l2=0.0)
    >>> round(float(cal.bias[1] - cal.bias[0]), 4) == round(float(np.log(3)), 4)
    True
    """
    start = start or Calibration()
    s = np.asarray(scores, dtype=float)
    num_classes = s.shape[1]
    if start.offset.size:
        s = s + start.offset
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return Calibration(offset=start.offset)  # nothing to fit on: the offset alone
    onehot = np.eye(num_classes)[labels]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[0], theta[1:]
        logq = log_softmax(a * s + b, axis=1)
        resid = np.exp(logq) - onehot  # d NLL / d z
        value = -float((logq * onehot).sum()) + l2 / 2 * (float(b @ b) + (a - 1) ** 2)
        grad = np.concatenate([[float((resid * s).sum()) + l2 * (a - 1)], resid.sum(axis=0) + l2 * b])
        return value, grad

    theta0 = np.concatenate([[1.0], np.zeros(num_classes)])
    bounds = [(0.0, None)] + [(None, None)] * num_classes
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 500, "gtol": 1e-10, "ftol": 1e-14})
    return Calibration(offset=start.offset, scale=float(res.x[0]), bias=res.x[1:].copy())


def fit(kind: str, val_scores: np.ndarray | None = None, val_labels: np.ndarray | None = None,
        content_free_scores: np.ndarray | None = None, l2: float = 1.0) -> Calibration:
    """The calibration `kind` (one of CALIBRATIONS) from calibration data only (see module doc)."""
    if kind not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {kind!r}; choose one of {', '.join(CALIBRATIONS)}")
    if kind == "none":
        return Calibration()
    start = fit_contextual(content_free_scores) if kind in ("contextual", "both") else None
    if kind == "contextual":
        return start
    return fit_bias(val_scores, val_labels, start, l2)


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of rows) * |accuracy - confidence|,
    with confidence = the largest softmax probability over the classes (NaN for no rows)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    probs = softmax(np.asarray(scores, dtype=float), axis=1)
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    # bin k holds confidences in (k/bins, (k+1)/bins]; confidence >= 1/C > 0, so none falls below bin 0
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for k in np.unique(which):
        inside = which == k
        total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(total)


def calibrated_metrics(scores: np.ndarray, labels: np.ndarray, chosen: str,
                       fits: dict[str, Calibration]) -> dict:
    """Raw metrics (accuracy, macro_f1, auroc, ece, n) and, unless `chosen` is 'none', the same with
    the `chosen` fit as `<metric>_cal`; any other fit in `fits` adds `accuracy_<name>` and
    `macro_f1_<name>` (with 'both', the contextual and bias parts come free from the same scores)."""
    out = {**classification_metrics(scores, labels), "ece": expected_calibration_error(scores, labels)}
    if chosen == "none":
        return out
    out["calibration"] = chosen
    cal = fits[chosen].apply(scores)
    metrics = classification_metrics(cal, labels)
    out.update({f"{m}_cal": metrics[m] for m in ("accuracy", "macro_f1", "auroc")})
    out["ece_cal"] = expected_calibration_error(cal, labels)
    for name, calibration in fits.items():
        if name != chosen:
            part = classification_metrics(calibration.apply(scores), labels)
            out.update({f"accuracy_{name}": part["accuracy"], f"macro_f1_{name}": part["macro_f1"]})
    return out
