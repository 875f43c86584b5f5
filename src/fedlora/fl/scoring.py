"""Metric rows of the loaded adapter, raw and calibrated: the one scoring path of every engine.

The simulator (fl/engine.py), the serverless simulator (fl/gossip.py), the zero-shot rows
(experiment.py) and a Flower node (flower/node.py) all score through a `Scorer`:

    cal  = scorer.calibration_set(client.val)      # the loaded adapter's validation + content-free scores
    row  = scorer.metrics(client.test, cal)        # fit on `cal` only, apply to the test scores

With eval.calibration=none no calibration set is scored and a row is exactly
`classification_metrics` of the test scores plus its raw `ece`. Otherwise the fit
(`calibration.fit`, train/calibration.py) receives validation scores, their labels and the
content-free scores, never a test split; the test scores only reach `Calibration.apply`.

The global adapter on the global (and shifted) test is calibrated on `global_set`:
'pooled_val' pools every client's validation scores and labels under the global adapter (what a
client shares: its [n_val, C] score matrix and labels, no prompts or rows); 'holdout' scores
`Federation.global_holdout`, global-test pool rows beyond eval.max_examples (simulation only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.config import ConfigError
from fedlora.train import calibration
from fedlora.train.batches import EncodedExamples
from fedlora.train.encode import encode_content_free
from fedlora.train.evaluate import label_loglik


@dataclass
class CalibrationSet:
    """What a calibration is fitted on: labelled validation scores [n, C] and content-free scores
    [k, C] (None when the kind needs none), all under the adapter being calibrated."""

    scores: np.ndarray
    labels: np.ndarray
    content_free: np.ndarray | None = None


def pool(parts: list[CalibrationSet], content_free: np.ndarray | None) -> CalibrationSet:
    """Several clients' validation scores and labels as one set (same adapter, same classes)."""
    return CalibrationSet(np.concatenate([p.scores for p in parts]), np.concatenate([p.labels for p in parts]),
                          content_free)


def fit_all(kind: str, cal: CalibrationSet | None) -> dict[str, calibration.Calibration]:
    """{kind: its fit}; with 'both', its contextual and bias parts too (reported beside it)."""
    if kind == "none" or cal is None:
        return {}
    names = ("both", "contextual", "bias") if kind == "both" else (kind,)
    return {name: calibration.fit(name, cal.scores, cal.labels, cal.content_free) for name in names}


def make_scorer(fed):
    """The scorer of `fed`'s task: a `Scorer` for a table, a `GenerationScorer` (fl/generation.py)
    for generation records; both are used through the same calls."""
    from fedlora.fl.generation import GenerationScorer, is_generation

    if getattr(fed, "parts", None) is not None:  # several sources: each set by its own source's scorer
        from fedlora.fl.sources import SourcesScorer

        return SourcesScorer(fed, make_scorer)
    return GenerationScorer(fed) if is_generation(fed) else Scorer(fed)


class Scorer:
    """Scores sets with whatever adapter `fed.model` holds, and turns test scores into metric rows."""

    samples: list[dict] | None = None
    """Generations kept for samples.jsonl (a GenerationScorer's; none here)."""

    def __init__(self, fed):
        self.fed, self.kind = fed, fed.cfg.eval.calibration
        self.batch_size = fed.cfg.eval.batch_size
        needs_cf = self.kind in ("contextual", "both")
        # Built from the table's schema only; a Flower node with its own table builds its own.
        self.content_free = encode_content_free(fed.tokenizer, fed.table, fed.cfg.data) if needs_cf else None

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def scores(self, data: EncodedExamples) -> np.ndarray:
        """[n, C] label log-likelihoods of `data` under the loaded adapter."""
        return label_loglik(self.fed.model, data, self.fed.pad_id, self.batch_size)

    def content_free_scores(self) -> np.ndarray | None:
        return None if self.content_free is None else self.scores(self.content_free)

    def calibration_set(self, val: EncodedExamples, content_free: np.ndarray | None = None) -> CalibrationSet | None:
        """The loaded adapter's scores of `val` (labelled) and of the content-free prompts
        (`content_free` when already scored under this adapter); None when calibration is off."""
        if not self.on:
            return None
        cf = content_free if content_free is not None else self.content_free_scores()
        if self.kind == "contextual":  # needs no labelled rows: skip scoring them
            return CalibrationSet(np.zeros((0, len(val.verbalizer_ids))), np.zeros(0, dtype=np.int64), cf)
        return CalibrationSet(self.scores(val), np.asarray(val.labels), cf)

    def metrics(self, data: EncodedExamples, cal: CalibrationSet | None) -> dict:
        """Metrics of the loaded adapter on `data`: raw (accuracy, macro_f1, auroc, ece, n) and, with
        calibration on, the `_cal` columns from a fit on `cal` alone (`n_cal`: its labelled rows)."""
        out = calibration.calibrated_metrics(self.scores(data), data.labels, self.kind, fit_all(self.kind, cal))
        if cal is not None:
            out["n_cal"] = int(len(cal.labels))
        return out

    def global_set(self, under_global: list[CalibrationSet] | None = None) -> CalibrationSet | None:
        """With the global adapter loaded: the calibration set of the global and shifted tests.

        'pooled_val': the clients' validation sets under this adapter (`under_global` when the
        caller already scored them under it, else scored here); 'holdout': `fed.global_holdout`."""
        if not self.on:
            return None
        if self.fed.cfg.eval.global_calibration == "holdout":
            holdout = getattr(self.fed, "global_holdout", None)
            if holdout is None:
                raise ConfigError("eval.global_calibration=holdout: this federation has no holdout rows (it was "
                                  "prepared with another eval config); prepare it with this config")
            return self.calibration_set(holdout)
        if under_global:
            return pool(under_global, under_global[0].content_free if under_global else None)
        cf = self.content_free_scores()
        return pool([self.calibration_set(c.val, cf) for c in self.fed.clients], cf)
