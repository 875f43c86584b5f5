"""A federation on generation records, and the scorer every engine uses for it.

`prepare()` hands a table of kind 'generation' to `prepare_generation`: the same partition,
the same seeded evaluation caps (the stream `[seed, 7]`, as for tables) and the same model, with
each split encoded by `train/gen_encode.py` instead of a row serializer. No calibration holdout,
no shifted test: both need class labels.

`GenerationScorer` has the interface of `fl/scoring.Scorer`, so the simulator, the serverless
simulator and the zero-shot rows score a generation task through their usual calls: there is no
calibration (`calibration_set` and `global_set` give None), and `metrics(data, None)` is the
generation row of `train/gen_eval.generation_metrics`. The first `eval.samples` generations of
each scored set are kept in `samples` (the latest evaluation only), for samples.jsonl.
"""

from __future__ import annotations

import numpy as np

from fedlora.fl.splits import ClientSplits, Federation, cap_rows as _cap
from fedlora.jsonio import jsonl_lines
from fedlora.train.gen_encode import GenerationExamples, encode_generation
from fedlora.train.gen_eval import generation_metrics


def prepare_generation(cfg, model, tokenizer, table, partition):
    """The Federation of a generation table (see the module doc); called by `federation.prepare`."""
    rng = np.random.default_rng([cfg.seed, 7])  # the stream the table path draws its caps from
    cap, dcfg = cfg.eval.max_examples, cfg.data

    def encode(rows: np.ndarray, name: str) -> GenerationExamples:
        return encode_generation(tokenizer, table.frame.iloc[rows], dcfg.max_length, dcfg.prompt_style, name)

    clients = []
    for i, client in enumerate(partition.clients):
        rows = {"train": client.train, "val": _cap(client.val, cap, rng), "test": _cap(client.test, cap, rng)}
        encoded = {k: encode(v, f"client {i} {k}") for k, v in rows.items()}
        clients.append(ClientSplits(encoded["train"], encoded["val"], encoded["test"], rows))
    global_rows = _cap(partition.global_test, cap, rng)
    return Federation(cfg, model, tokenizer, table, partition, clients, encode(global_rows, "global test"),
                      global_rows)


class GenerationScorer:
    """Scores generation sets with whatever adapter `fed.model` holds (see the module doc)."""

    on = False
    """No calibration: it needs label scores."""

    def __init__(self, fed):
        self.fed, ev = fed, fed.cfg.eval
        self.batch_size, self.max_new_tokens, self.keep = ev.batch_size, ev.max_new_tokens, ev.samples
        self.samples: list[dict] = []

    def content_free_scores(self):
        return None

    def calibration_set(self, val, content_free=None):
        return None

    def global_set(self, under_global=None):
        return None

    def metrics(self, data: GenerationExamples, cal=None) -> dict:
        """rouge1, rouge2, rougeL, exact_match, perplexity and n of the loaded adapter on `data`."""
        row, shown = generation_metrics(self.fed.model, self.fed.tokenizer, data, self.fed.pad_id,
                                        self.max_new_tokens, self.batch_size, self.keep)
        self.samples.extend(shown)
        return row


def is_generation(fed) -> bool:
    return getattr(fed.table, "kind", None) == "generation"


def write_samples(path, samples: list[dict], **fields) -> None:
    """samples.jsonl: one generation per line, each with `fields` (method, round) first."""
    path.write_text(jsonl_lines([{**fields, **s} for s in samples]), encoding="utf-8")
