"""Client rules: what a client does in a round around the method's own step, and what it adds.

The plain rule is the method alone (`ClientRuntime.train` on the client's rows). A rule such as
Concordia (`fl/concordia.py`) replaces the rows (synthetic ones), weights them, fits models of its
own after training and sends some of them in a declared side channel (`fl/schema.py`), whose
server-side handler (`absorb`) keeps them in the run state's field `state_field` and hands them
out again in `download_extra`. The engine knows only this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.fl.schema import SideChannel

if TYPE_CHECKING:
    from fedlora.fl.engine import Simulator
    from fedlora.fl.methods import Method
    from fedlora.fl.state import RunResult, RunState
    from fedlora.fl.timer import Timer


class ClientRule:
    name: str = "plain"
    side_channels: tuple[SideChannel, ...] = ()
    state_field: str | None = None
    """The RunState field holding the rule's state (its side channels' server-side copies)."""

    def check(self, method: Method) -> None:
        """Refuse, before round 1, a method this rule cannot run with."""

    def bind(self, sim: Simulator) -> None:
        self.sim = sim

    def initial_state(self, state: RunState) -> None:
        """Add the rule's own state to a fresh run state."""

    def download_extra(self, state: RunState) -> dict:
        """Tensors the server sends every client beside the method's download."""
        return {}

    def client_round(self, state: RunState, cid: int, round_index: int, received: dict,
                     timer: Timer) -> tuple[dict, dict]:
        """(payload, row) of client `cid`: by default the method's own step on its rows."""
        return self.sim.local_round(state, cid, round_index, received, timer)

    def sample_weights(self, cid: int) -> np.ndarray | None:
        """Per-row weights of client `cid`'s training rows this round (None: uniform)."""
        return None

    def absorb(self, st: Any, channel: SideChannel, cid: int, tensors: dict) -> Any:
        """The server keeps what client `cid` sent in `channel`; returns the new rule state."""
        return st

    def save_extras(self, result: RunResult, folder: Path) -> list[Path]:
        return []
