"""What a simulated federation holds once prepared: the shared model, the table, each client's splits.

Kept apart from `federation.prepare` so that task-specific preparers (fl/generation.py) can build a
`Federation` without importing the module that dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.config import RunConfig
from fedlora.data import Partition, Table
from fedlora.train.batches import EncodedExamples


@dataclass
class ClientSplits:
    train: EncodedExamples
    val: EncodedExamples
    test: EncodedExamples
    rows: dict[str, np.ndarray]
    """Row positions into table.frame for each split (for the classical baseline)."""


@dataclass
class Federation:
    cfg: RunConfig
    model: object
    tokenizer: object
    table: Table | None
    partition: Partition | None
    clients: list[ClientSplits]
    global_test: EncodedExamples
    global_rows: np.ndarray
    shifted_test: EncodedExamples | None = None
    """Rows above `data.shift_quantile` of `data.shift_column`, which no client holds (or None)."""
    global_holdout: EncodedExamples | None = None
    """eval.global_calibration=holdout: global-test pool rows beyond eval.max_examples (at most that
    many, drawn like the global test), which calibrate the global test and are never scored as test."""
    parts: list[Federation] | None = None
    """Several sources (data.clients; fl/sources.py): each source's own Federation. `table` and
    `partition` are then None, and `clients` are the parts' clients in entry order."""
    tasks: list[str] | None = None
    """The parts' task names (several sources)."""
    client_task: list[str] | None = None
    """Each client's task name (several sources)."""

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def num_clients(self) -> int:
        return len(self.clients)


def cap_rows(rows: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` rows, a seeded subsample in the original order (evaluation cost cap)."""
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(rng.choice(rows, size=limit, replace=False))
