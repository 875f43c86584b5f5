"""Rows of a table (real or synthetic) to the token-level examples local training and evaluation use.

`encode_rows` is the one way rows become prompts: the federation encodes its clients' splits
with it (`fl/federation.py`) and Concordia its synthetic rows (`fl/concordia.py`), so both see
the same prompt text, prompt style, system prompt and verbalizers. `row_labels` gives each row's
class index, with a clear error for a label outside `table.classes`. `encode_content_free` encodes
the content-free prompts of contextual calibration through the same path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedlora.data.schema import Table, _label_text
from fedlora.data.text import RowSerializer
from fedlora.train.batches import EncodedExamples, encode_examples

CONTENT_FREE_TOKENS = ("N/A", "[MASK]", "")
"""The content-free inputs of Zhao et al. (arXiv 2101.09690): every feature value (or the text) set
to one of these; the mean of their label probabilities estimates the model's prior per label word."""


def _check_rows(table: Table, frame: pd.DataFrame, what: str, allow_empty: bool = False) -> None:
    if len(frame) == 0 and not allow_empty:
        raise ValueError(f"{what}: no rows; pass a DataFrame with at least one row")
    missing = [c.name for c in table.columns if c.name not in frame.columns]
    if table.target not in frame.columns:
        missing.append(table.target)
    if missing:
        raise ValueError(f"{what}: the rows lack column(s) {missing}; synthetic rows must have the "
                         f"columns of table.frame ({list(table.frame.columns)})")


def row_labels(table: Table, frame: pd.DataFrame) -> np.ndarray:
    """Each row's class index into `table.classes` (int64), as `Table.labels` for table.frame."""
    lookup = {c: i for i, c in enumerate(table.classes)}
    names = frame[table.target].map(_label_text)
    bad = ~names.isin(list(lookup)).to_numpy()
    if bad.any():
        example = frame[table.target].to_numpy()[bad][0]
        raise ValueError(f"{int(bad.sum())} row(s) have target {table.target!r} outside the classes "
                         f"{table.classes} (e.g. {example!r}); drop or repair those rows first")
    return names.map(lookup).to_numpy(dtype=np.int64)


def encode_rows(tokenizer, serializer: RowSerializer, table: Table, frame: pd.DataFrame,
                max_length: int, *, allow_empty: bool = False) -> EncodedExamples:
    """Encode any rows with table.frame's columns (real or synthetic) exactly as the federation does.

    Same prompt text (the client's fitted `serializer`), prompt style and system prompt, same
    verbalizers: `fl/federation._encode(tok, ser, table, rows, n)` is
    `encode_rows(tok, ser, table, table.frame.iloc[rows], n, allow_empty=True)`.
    No rows is an error unless `allow_empty` (a federation split may be empty, e.g. with
    data.global_test_fraction=0; a set of synthetic rows to train on or score may not).
    """
    _check_rows(table, frame, "encode_rows", allow_empty)
    cfg = serializer.cfg
    return encode_examples(tokenizer, serializer.prompts(frame), row_labels(table, frame),
                           serializer.verbalizers, max_length, cfg.prompt_style, cfg.system_prompt)


def encode_content_free(tokenizer, table: Table, cfg, tokens: tuple[str, ...] = CONTENT_FREE_TOKENS) -> EncodedExamples:
    """One content-free prompt per token (`RowSerializer.content_free_prompt`), encoded like real rows:
    same question, prompt style, system prompt, max_length (`cfg`, a DataConfig) and verbalizers.
    Labels are -1 (there are none). No row's values enter, so no fitted bins are needed."""
    serializer = RowSerializer(table, cfg)
    prompts = [serializer.content_free_prompt(t) for t in tokens]
    return encode_examples(tokenizer, prompts, np.full(len(prompts), -1), serializer.verbalizers,
                           cfg.max_length, cfg.prompt_style, cfg.system_prompt)
