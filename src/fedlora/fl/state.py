"""What a run carries from round to round (`RunState`, what a checkpoint saves) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunState:
    """Everything a run carries from round to round (what a checkpoint saves). A combine
    transform's state is the field of its name (fl/combine.py)."""

    server: dict
    clients: list[dict]
    optimizer: list[dict | None]
    round: int = 0
    momentum: list[dict | None] | None = None
    """Per-client worker-momentum state (`fl/momentum.py`) when robust.momentum is set."""
    aggregator: dict | None = None
    """The robust chain's state (e.g. centered clipping's previous output) when one is set."""
    stale: list[dict] | None = None
    """Stragglers' updates waiting for the next round (fl.straggler_policy=stale; fl/faults.py)."""
    dp: dict | None = None
    """DP-FedAvg's clip norm and accountant history (`fl/dp.py`, JSON-serializable) when dp is on."""
    synthetic: dict | None = None
    """Concordia's per-client generators and scorers and the shared scorer ensemble (fl/concordia.py)."""


@dataclass
class RunResult:
    method: str
    personalized: bool
    rows: list[dict] = field(default_factory=list)
    """metrics.jsonl rows: one per (round, client), per (round, 'global'), per (round, 'server')."""
    state: RunState | None = None

    def final(self, client: str | int) -> dict | None:
        rows = [r for r in self.rows if r["client"] == client and "accuracy" in r]
        return rows[-1] if rows else None
