"""Wall-clock seconds per phase of a round (train, swap, serialize, aggregate, ...)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class Timer:
    """`with timer("train"): ...` adds the block's seconds to `timer.seconds["train"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def row(self) -> dict[str, float]:
        """The `time_<phase>` fields of a server row."""
        return {f"time_{k}": round(v, 4) for k, v in self.seconds.items()}
