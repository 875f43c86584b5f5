"""Every random stream of a run, by name: one table, so no two features can draw the same numbers.

A stream is a generator seeded from (run seed, round, scope, the stream's key). Client streams
are per (round, client): a client's draws do not depend on which other clients were sampled.
Server streams are per round. `Streams(seed).numpy("dropout", r, cid)` and
`Streams(seed).torch("dp_noise", r)` are the only ways the engines draw randomness.

The keys of the streams that existed before this table are kept as they were (`_LEGACY`), so
runs recorded earlier reproduce bit for bit. A stream added later gets its key from its name
(`name_key`), so a new feature never has to pick, or coordinate, a number. The table is checked
at import: two names with one key fail loudly.

>>> s = Streams(7)
>>> bool(s.numpy("dropout", 1, 0).random() == s.numpy("dropout", 1, 0).random())
True
>>> bool(s.numpy("dropout", 1, 0).random() == s.numpy("latency", 1, 0).random())
False
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

SERVER = 10**6
"""The scope of server streams (no client id reaches it)."""

# name -> (scope, key). Client scope: seed sequence [seed, round, client, *key]; server scope:
# [seed, round, SERVER + key]. Kept from before the table, so earlier runs reproduce.
_LEGACY: dict[str, tuple[str, tuple[int, ...]]] = {
    "train": ("client", ()),               # batch order, LoRA dropout (fork of torch's generator)
    "fresh_adapter": ("client", (1,)),     # FLoRA: a new A each round
    "dropout": ("client", (2,)),           # fl.dropout
    "latency": ("client", (3,)),           # fl.deadline: the simulated round time
    "concordia.sample": ("client", (21,)),
    "concordia.refine": ("client", (22,)),
    "concordia.fit": ("client", (23,)),
    "concordia.score": ("client", (24,)),
    "client_sampling": ("server", (0,)),   # fixed-size sampling: m of N without replacement
    "attack": ("server", (1,)),            # simulated update attacks
    "robust_chain": ("server", (2,)),      # bucketing and other randomized pre-aggregators
    "dp_noise": ("server", (3,)),          # DP-FedAvg: Gaussian noise on the clipped sum
    "dp_count": ("server", (4,)),          # adaptive clipping: noise on the unclipped count
}

_NEW: dict[str, str] = {
    "client_sampling.poisson": "server",   # each client joins a round with probability q
}


def name_key(name: str) -> tuple[int, ...]:
    """The key of a stream added after the table: a 32-bit hash of its name, above every legacy key."""
    return (1000 + zlib.crc32(name.encode("utf-8")),)


def _table() -> dict[str, tuple[str, tuple[int, ...]]]:
    table = dict(_LEGACY)
    for name, scope in _NEW.items():
        table[name] = (scope, name_key(name))
    return table


STREAMS = _table()


def _check_distinct() -> None:
    """No two streams draw the same numbers. Compared on numpy's seeded state, not on the keys:
    numpy pads a seed sequence with zeros, so [s, r, c] and [s, r, c, 0] would be one stream."""
    seen: dict[tuple[int, ...], str] = {}
    for name, (scope, _) in STREAMS.items():
        state = tuple(np.random.SeedSequence(seed_sequence(7, name, 3, 5 if scope == "client" else None))
                      .generate_state(4).tolist())
        if state in seen:
            raise RuntimeError(f"random streams {seen[state]!r} and {name!r} draw the same numbers; "
                               "give one of them another key")
        seen[state] = name


def seed_sequence(seed: int, name: str, round_index: int, client_id: int | None = None) -> list[int]:
    """The numpy seed sequence of stream `name`; client streams need a client id, server streams none."""
    if name not in STREAMS:
        raise KeyError(f"unknown random stream {name!r}; declare it in fedlora.fl.streams (known: "
                       f"{', '.join(sorted(STREAMS))})")
    scope, key = STREAMS[name]
    if (scope == "client") != (client_id is not None):
        raise ValueError(f"stream {name!r} is a {scope} stream: "
                         f"{'pass' if scope == 'client' else 'do not pass'} a client id")
    if scope == "client":
        return [seed, round_index, client_id, *key]
    return [seed, round_index, SERVER + key[0]]


_check_distinct()


class Streams:
    """The run's random streams (see the module docstring)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def numpy(self, name: str, round_index: int, client_id: int | None = None) -> np.random.Generator:
        return np.random.default_rng(seed_sequence(self.seed, name, round_index, client_id))

    def integer(self, name: str, round_index: int, client_id: int | None = None, bound: int = 2**62) -> int:
        """One integer in [0, bound) from the stream (a seed for another library's generator)."""
        return int(self.numpy(name, round_index, client_id).integers(bound))

    def torch(self, name: str, round_index: int, client_id: int | None = None) -> torch.Generator:
        return torch.Generator().manual_seed(self.integer(name, round_index, client_id))
