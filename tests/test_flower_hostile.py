"""Hostile and broken nodes against the Flower server: no reply can raise out of a round.

The ServerApp's own loop (`apps.run`: wait for nodes, discover who is who, drive the rounds,
evaluate, save) runs over a fake Grid whose nodes answer at once: honest ones are real `Node`s,
hostile ones return crafted replies. Every bad reply must be rejected with its reason code and
counted in its round's server row, and the global adapter must be the aggregate of the honest
replies alone (bitwise: the same as a run where the hostile client never answered).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from uuid import uuid4

import pytest
import torch

pytest.importorskip("flwr")

from conftest import make_config  # noqa: E402
from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402

import fedlora.fl.payload as payload_module  # noqa: E402
from fedlora import PayloadError  # noqa: E402
from fedlora.fl.payload import decode, encode  # noqa: E402
from fedlora.flower import apps  # noqa: E402
from fedlora.flower.config import MIN_NODES_KEY, OUTPUT_KEY, TIMEOUT_KEY, run_config_values  # noqa: E402
from fedlora.flower.coordinator import Coordinator  # noqa: E402
from fedlora.flower.node import Node  # noqa: E402
from fedlora.flower.wire import PAYLOAD, RECORD  # noqa: E402
from fedlora.jsonio import read_jsonl  # noqa: E402

OVERRIDES = ("fl.eval_every=0", "eval.global_test=false")
Handler = Callable[[Message], RecordDict]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower's per-process identity (run, node, task), which a ServerApp process has set before
    `main` runs and `Message(...)` reads."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """The Grid calls the ServerApp makes (get_node_ids, push_messages, pull_messages). Each pushed
    message is answered at once by its node's handler; pulls return replies in push order."""

    def __init__(self, handlers: dict[int, Handler]):
        self.handlers = handlers
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid4())  # as Flower's InMemoryGrid does
            self.replies[mid] = Message(self.handlers[msg.metadata.dst_node_id](msg), reply_to=msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(mid) for mid in list(self.replies) if mid in set(ids)]


def honest(cfg, cid: int) -> Handler:
    node, state = Node(cfg, {"partition-id": cid}), RecordDict()
    kinds = {MessageType.QUERY: lambda m: node.identify(), MessageType.TRAIN: lambda m: node.train(m.content, state),
             MessageType.EVALUATE: lambda m: node.evaluate(m.content, state)}
    return lambda msg: kinds[msg.metadata.message_type](msg)


def claiming(claim) -> Handler:
    """A node whose every reply says `partition-id=claim` (None: says nothing) and nothing else."""
    fields = {} if claim is None else {"partition-id": claim}
    return lambda msg: RecordDict({RECORD: ConfigRecord(dict(fields))})


def forged(coord: Coordinator, cid: int, r: int, count: object = 5, claim: int | None = None, **fields) -> RecordDict:
    """A train reply whose payload is valid for client `cid` in round `r` except where told: tensors
    of the schema's names and shapes (all 3.0, so an accepted one would show in the adapter)."""
    spec = coord.server.schemas[cid].tensors
    tensors = {k: torch.full(shape, 3.0, dtype=dtype) for k, (shape, dtype) in spec.items()}
    blob = encode(tensors, {"num_examples": count}, round_index=r, client_id=cid)
    return RecordDict({RECORD: ConfigRecord({PAYLOAD: blob, "partition-id": cid if claim is None else claim,
                                             "train-loss": 0.5, **fields})})


def many_empty_tensors(r: int, cid: int, count: int = 200_000) -> bytes:
    """A safetensors blob whose header declares `count` empty tensors (about 13 MB, no data)."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    header["__metadata__"] = {"fedlora": json.dumps({"client_id": cid, "num_examples": 1, "round": r})}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def hostile_client(coord: Coordinator, cid: int) -> tuple[Handler, dict[int, str]]:
    """The node of client `cid`: it answers the query honestly, then sends one bad reply per round
    (and bad metrics when evaluated). Returns the handler and the reason expected per round."""
    plan = {
        1: ("examples", lambda r: forged(coord, cid, r, count=0)),
        2: ("examples", lambda r: forged(coord, cid, r, count=10**400)),
        3: ("examples", lambda r: forged(coord, cid, r, count=10**15)),
        4: ("no_payload", lambda r: RecordDict({RECORD: ConfigRecord({"partition-id": cid, "train-loss": 0.1})})),
        5: ("identity", lambda r: forged(coord, cid, r, claim=0)),  # a valid payload, another node's id
        6: ("size", lambda r: RecordDict({RECORD: ConfigRecord({PAYLOAD: many_empty_tensors(r, cid),
                                                                "partition-id": cid})})),
        7: ("no_record", lambda r: RecordDict()),
        8: ("round", lambda r: forged(coord, cid, r - 1)),  # a replay of last round's upload
        9: ("sender", lambda r: RecordDict({RECORD: ConfigRecord({**dict(forged(coord, 0, r)[RECORD]),
                                                                  "partition-id": cid})})),  # client 0's upload
    }

    def handle(msg: Message) -> RecordDict:
        kind, r = msg.metadata.message_type, int(msg.metadata.group_id)
        if kind == MessageType.QUERY:
            return RecordDict({RECORD: ConfigRecord({"partition-id": cid})})
        if kind == MessageType.EVALUATE:
            return RecordDict({RECORD: ConfigRecord({"partition-id": cid, "metrics": '{"accuracy": [1]}'})})
        return plan[r][1](r)

    return handle, {r: reason for r, (reason, _) in plan.items()}


def run_over(grid: FakeGrid, cfg, out) -> Coordinator:
    return apps.run(grid, {**run_config_values(cfg), TIMEOUT_KEY: 5.0, MIN_NODES_KEY: len(grid.handlers),
                           OUTPUT_KEY: str(out)})


def only_honest(cfg, honest_ids: list[int]) -> Coordinator:
    """The reference: the ServerApp's round loop where only `honest_ids` ever answer."""
    coord = Coordinator(cfg)
    nodes = {cid: honest(cfg, cid) for cid in honest_ids}

    def exchange(contents, kind, group):
        return {cid: nodes[cid](Message(c, dst_node_id=cid, message_type=kind, group_id=group))
                for cid, c in contents.items() if cid in nodes}

    return apps.drive(coord, {cid: 1000 + cid for cid in range(cfg.partition.num_clients)}, exchange)


def servers(coord: Coordinator) -> list[dict]:
    return [r for r in coord.rows if r["client"] == "server"]


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "adapters differ"


def test_every_hostile_reply_is_rejected_counted_and_the_run_goes_on(tmp_path):
    """Query discovery with three bad claims (another node's partition, none, 99 of 3), then one
    registered node that sends a different bad reply every round and bad metrics at the end."""
    cfg = make_config(*OVERRIDES, "fl.rounds=9", "fl.method=fedit")
    coord = Coordinator(cfg)
    bad_client, reasons = hostile_client(coord, 2)
    grid = FakeGrid({10: honest(cfg, 0), 11: honest(cfg, 1), 12: bad_client,
                     20: claiming(0), 21: claiming(None), 22: claiming(99)})
    result = run_over(grid, cfg, tmp_path)

    rows = servers(result)
    assert len(rows) == cfg.fl.rounds
    for r, row in enumerate(rows, start=1):
        nodes = {"claim_duplicate": 1, "claim_missing": 1, "claim_range": 1} if r == 1 else {}
        evals = {"metrics": 1} if r == cfg.fl.rounds else {}
        expected = {reasons[r]: 1}
        for extra in (nodes, evals):
            expected.update({k: expected.get(k, 0) + v for k, v in extra.items()})
        assert row["reject_reasons"] == dict(sorted(expected.items())), r
        assert row["rejected"] == [2] and row["replies"] == 2 and not row["skipped"] and row["dropped"] == []
        assert row["num_rejected"] == 1 + sum(nodes.values()) + sum(evals.values())
    assert rows[0]["rejected_nodes"] == [20, 21, 22] and "rejected_nodes" not in rows[1]
    assert rows[-1]["eval_rejected"] == [2]
    assert {r["client"] for r in result.rows if r.get("split") == "test"} == {0, 1}

    ref = only_honest(cfg, [0, 1])
    assert_same(result.state.server, ref.state.server)
    assert [r["replies"] for r in servers(ref)] == [2] * cfg.fl.rounds
    saved = read_jsonl(tmp_path / "metrics.jsonl")  # strict JSON on disk
    assert [r["reject_reasons"] for r in saved if r["client"] == "server"] == [r["reject_reasons"] for r in rows]


@pytest.mark.parametrize("claim, reason", [(0, "claim_duplicate"), (None, "claim_missing"), (99, "claim_range"),
                                           ("1", "claim_missing"), (True, "claim_missing")])
def test_bad_claim_in_the_broadcast_round_is_rejected(tmp_path, claim, reason):
    """As many nodes as clients: round 1 is broadcast and its replies say who is who. A bad claim
    there is a rejected node (counted in round 1); its partition has no node: dropped in round 1,
    then no longer sampled."""
    cfg = make_config(*OVERRIDES)
    grid = FakeGrid({10: honest(cfg, 0), 11: honest(cfg, 1), 12: claiming(claim)})
    result = run_over(grid, cfg, tmp_path)
    first, second = servers(result)
    assert first["rejected_nodes"] == [12] and first["reject_reasons"] == {reason: 1} and first["num_rejected"] == 1
    assert first["dropped"] == [2] and second["sampled"] == [0, 1] and second["num_rejected"] == 0
    assert_same(result.state.server, only_honest(cfg, [0, 1]).state.server)


def test_too_few_valid_replies_skip_the_round(tmp_path):
    """fl.min_replies=2 with one honest node left: every round is skipped, the adapter unchanged."""
    cfg = make_config(*OVERRIDES, "fl.min_replies=2")
    coord = Coordinator(cfg)
    initial = {k: v.clone() for k, v in coord.state.server.items()}
    grid = FakeGrid({10: honest(cfg, 0), 11: lambda m: forged(coord, 1, int(m.metadata.group_id), count=0),
                     12: lambda m: RecordDict()})
    result = run_over(grid, cfg, tmp_path)
    first, last = servers(result)
    assert [(r["skipped"], r["replies"], r["num_rejected"]) for r in (first, last)] == [(True, 1, 2), (True, 1, 2)]
    assert first["reject_reasons"] == {"examples": 1, "no_record": 1}  # node 12 held no partition after round 1
    assert last["reject_reasons"] == {"examples": 1, "metrics": 1}  # node 11's evaluate reply is a train reply
    assert_same(result.state.server, initial)


def test_header_of_200000_tensors_is_refused_unread(monkeypatch):
    """The schema's size cap is its tensor bytes plus a few kB of header, so the 13 MB header is
    refused on its length; under a generous cap, its declared names are refused before any tensor
    is read. The safetensors parser must never run (patched to fail)."""
    cfg = make_config(*OVERRIDES)
    coord = Coordinator(cfg)
    schema = coord.server.schemas[0]
    honest_blob = forged(coord, 0, 1)[RECORD][PAYLOAD]
    assert len(honest_blob) <= schema.max_bytes < len(honest_blob) + 16 * 1024
    schema.receive(honest_blob, round_index=1, sender=0, max_examples=10)  # the honest one passes

    def never(*_):
        raise AssertionError("the tensors of a rejected payload were parsed")

    monkeypatch.setattr(payload_module, "st_load", never)
    blob = many_empty_tensors(1, 0)
    with pytest.raises(PayloadError) as info:
        schema.receive(blob, round_index=1, sender=0, max_examples=10)
    assert info.value.reason == "size"
    with pytest.raises(PayloadError, match="200000 declared") as info:
        decode(blob, expected=schema.expected, max_bytes=len(blob))
    assert info.value.reason == "keys"
    # The same count but shapes that do not match: refused on the header, still unread.
    wrong = forged(coord, 0, 1)[RECORD][PAYLOAD].replace(b'"shape":[4,', b'"shape":[5,', 1)
    with pytest.raises(PayloadError) as info:
        decode(wrong, expected=schema.expected, max_bytes=schema.max_bytes)
    assert info.value.reason == "shape"


def test_reply_without_payload_is_counted_not_raised():
    """Straight through `absorb_train`: a reply without `fedlora.payload`, one without the record,
    and one whose informative scalars are garbage but whose payload is valid (that one counts)."""
    cfg = make_config(*OVERRIDES)
    coord = Coordinator(cfg)
    garbage_scalars = forged(coord, 2, 1, **{"train-loss": 10**400, "train-seconds": "x", "bytes-down": -1})
    rows = coord.absorb_train(1, [0, 1, 2], {0: RecordDict({RECORD: ConfigRecord({"partition-id": 0})}),
                                             1: RecordDict(), 2: garbage_scalars})
    server = rows[-1]
    assert server["reject_reasons"] == {"no_payload": 1, "no_record": 1} and server["replies"] == 1
    assert rows[2]["bytes_down"] == 0 and rows[2]["train_loss"] != rows[2]["train_loss"]  # NaN


def test_flora_base_version_claim_is_checked():
    """FLoRA's nodes say which base version they hold; one the server never handed out is rejected."""
    cfg = make_config(*OVERRIDES, "fl.method=flora")
    coord = Coordinator(cfg)
    rows = coord.absorb_train(1, [0, 1], {0: forged(coord, 0, 1, **{"base-version": -3}),
                                          1: forged(coord, 1, 1, **{"base-version": "0"})})
    assert rows[-1]["reject_reasons"] == {"fields": 2} and rows[-1]["skipped"]
