"""What the Flower server checks in a node's reply beside its payload, before trusting any of it.

A reply is a Flower RecordDict from a machine the server does not control. fedlora reads one
ConfigRecord of it (`wire.RECORD`): the payload bytes, the node's claim (`partition-id`) and a few
scalars. Each check returns a clean value or raises `PayloadError` with a reason code; the server
counts the reply as rejected under that code in the round's row and goes on with the others:

  no_record        the reply has no `fedlora` ConfigRecord
  no_payload       a train reply has no `fedlora.payload` bytes (fl/wire.py)
  claim_missing    no integer `partition-id` (a query reply, or round 1's broadcast reply)
  claim_range      `partition-id` outside [0, partition.num_clients)
  claim_duplicate  a second node claims a partition another node already holds
  identity         a train or evaluate reply's `partition-id` is not the one its node registered
  fields           `base-version` (FLoRA) is not an integer the server handed out
  metrics          an evaluate reply's `metrics` is not a small flat JSON object of scalars
  error            validating the reply raised something else (a bug); logged with its traceback

The payload's own codes (size, parse, keys, shape, dtype, non_finite, metadata, round, sender,
examples) come from fl/payload.py and fl/schema.py. Identity is Flower's node id (which the
SuperLink assigns, and node authentication binds to a key) plus this claim: the first node to
claim a partition holds it for the run, and every later reply must repeat the same claim.
"""

from __future__ import annotations

import json
import logging
import math

from flwr.app import ConfigRecord, RecordDict

from fedlora.fl.payload import PayloadError
from fedlora.flower.wire import RECORD

log = logging.getLogger("fedlora")

MAX_METRICS_CHARS = 64 * 1024
"""An honest node's test metrics are a dozen numbers (a few hundred characters)."""
MAX_METRICS = 256
MAX_LABEL_CHARS = 200
"""A metric may be a short string (e.g. `calibration: both`)."""
RESERVED = ("client", "split", "round", "method")
"""Row keys the server sets itself: a node's metrics cannot overwrite them."""


def record_of(content: object) -> ConfigRecord:
    """The fedlora ConfigRecord of a reply."""
    record = content.get(RECORD) if isinstance(content, RecordDict) else None
    if not isinstance(record, ConfigRecord):
        raise PayloadError(f"reply has no {RECORD!r} ConfigRecord (got {type(record).__name__})", "no_record")
    return record


def claim_of(record: ConfigRecord, num_clients: int) -> int:
    """The client id a node claims: an int in [0, num_clients)."""
    cid = record.get("partition-id")
    if type(cid) is not int:  # bool is an int to Python, not a partition
        raise PayloadError(f"reply has no integer 'partition-id' (got {str(cid)[:40]!r})", "claim_missing")
    if not 0 <= cid < num_clients:
        raise PayloadError(f"partition-id={cid} is outside [0, {num_clients}) (partition.num_clients)",
                           "claim_range")
    return cid


def check_identity(record: ConfigRecord, cid: int, num_clients: int) -> None:
    """A reply from the node registered as client `cid` says it is `cid` (a node cannot switch)."""
    claimed = claim_of(record, num_clients)
    if claimed != cid:
        raise PayloadError(f"the node registered as partition-id={cid} now claims partition-id={claimed}",
                           "identity")


class Claims:
    """Which Flower node holds which client id, from the nodes' own claims: checked for type and
    range, first come first served, one node per id. Bad claims are kept as (node, reason)."""

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self.node_of: dict[int, int] = {}
        self.rejected: list[tuple[int, str]] = []

    def add(self, node: int, content: object) -> int | None:
        """Register `node`'s claim; its client id, or None (logged and kept in `rejected`)."""
        try:
            cid = claim_of(record_of(content), self.num_clients)
            if cid in self.node_of and self.node_of[cid] != node:
                raise PayloadError(f"partition-id={cid} is held by node {self.node_of[cid]} already",
                                   "claim_duplicate")
        except PayloadError as exc:
            log.warning("node %s rejected: %s", node, exc)
            self.rejected.append((node, exc.reason))
            return None
        self.node_of[cid] = node
        return cid


def informative(record: ConfigRecord) -> dict:
    """The row fields a train reply reports about itself (never used to aggregate). A wrong type
    or an out-of-range value reads as absent: a bad scalar costs the node its metrics, not its update."""
    return {"train_loss": _real(record.get("train-loss"), math.nan),
            "local_steps": _count(record.get("local-steps")),
            "bytes_down": _count(record.get("bytes-down"))}


def seconds(record: ConfigRecord, key: str) -> float:
    """A duration a node reports: a finite non-negative float, else 0."""
    value = _real(record.get(key), 0.0)
    return value if math.isfinite(value) and value >= 0 else 0.0


def base_version_of(record: ConfigRecord, current: int) -> int | None:
    """The base version a node says it holds (FLoRA), an int in [0, current]; None if it says none."""
    if "base-version" not in record:
        return None
    version = record["base-version"]
    if type(version) is not int or not 0 <= version <= current:
        raise PayloadError(f"base-version={str(version)[:40]!r}; the server has handed out 0..{current}", "fields")
    return version


def metrics_of(record: ConfigRecord) -> dict[str, object]:
    """An evaluate reply's test metrics: a flat JSON object of at most MAX_METRICS scalars (numbers,
    NaN kept, as an AUROC on a one-class test set is; short strings; null), without the keys the
    server sets."""
    raw = record.get("metrics")
    if not isinstance(raw, str) or len(raw) > MAX_METRICS_CHARS:
        raise PayloadError(f"'metrics' must be a JSON string of at most {MAX_METRICS_CHARS} characters", "metrics")
    try:
        metrics = json.loads(raw)
    except (ValueError, RecursionError):
        raise PayloadError("'metrics' is not JSON", "metrics") from None
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS or not all(map(_scalar, metrics.values())):
        raise PayloadError(f"'metrics' must be a JSON object of at most {MAX_METRICS} numbers or short strings",
                           "metrics")
    return {k: v for k, v in metrics.items() if k not in RESERVED}


def _scalar(value: object) -> bool:
    return value is None or type(value) in (int, float, bool) or (type(value) is str and len(value) <= MAX_LABEL_CHARS)


def merge_rejections(row: dict, key: str, rejected: list[tuple[int, str]]) -> None:
    """Add rejected replies (who, reason) to a server row: `key` lists who, and `num_rejected` and
    `reject_reasons` count them beside the rejected updates."""
    if not rejected:
        return
    row[key] = [who for who, _ in rejected]
    row["num_rejected"] = row.get("num_rejected", 0) + len(rejected)
    reasons = dict(row.get("reject_reasons", {}))
    for _, reason in rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    row["reject_reasons"] = dict(sorted(reasons.items()))


def _real(value: object, default: float) -> float:
    if type(value) not in (int, float):
        return default
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return default


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0
