"""The Flower apps: `server_app` (runs on the SuperLink's side) and `client_app` (on each SuperNode).

Both are thin (the app folder's server_app.py and client_app.py register the functions below,
`serve` and `query`/`train`/`evaluate`): the ServerApp drives a `Coordinator` over Flower's Grid (Message API), the
ClientApp hands each message to this process's `Node`. Message types used:
  query     server -> every node: which partition are you, how many training rows?
  train     server -> sampled nodes: the method's download; reply: the method's upload
  evaluate  server -> every node: the adapter to score; reply: test metrics (JSON)
All tensors travel as fedlora's safetensors bytes (`wire.py`), validated on receipt. A node is
its Flower node id plus the partition it claims in its first reply (`intake.Claims`: range and
uniqueness checked); a bad claim or reply is rejected and counted, never raised (docs/flower.md).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.config.sources import federation_size
from fedlora.fl.sources import tag_clients
from fedlora.flower.config import MIN_NODES_KEY, OUTPUT_KEY, RESUME_KEY, TIMEOUT_KEY, run_config_of
from fedlora.flower.coordinator import Coordinator, merge_round_rows
from fedlora.flower.intake import Claims
from fedlora.flower.node import node_for
from fedlora.flower.rundir import ERROR_FILE, checkpoint_round, finish_run_dir, open_run_dir
from fedlora.report.progress import round_line

log = logging.getLogger("fedlora")

def query(msg: Message, context: Context) -> Message:
    """A node's answer to `query`: the partition it holds and its training rows."""
    return Message(node_for(context.run_config, context.node_config).identify(), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """A node's local round: the server's download in, the method's upload out."""
    node = node_for(context.run_config, context.node_config)
    return Message(node.train(msg.content, context.state), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """A node's scores of the adapter the server sent, on its own test split."""
    node = node_for(context.run_config, context.node_config)
    return Message(node.evaluate(msg.content, context.state), reply_to=msg)


def serve(grid: Grid, context: Context) -> None:
    """The ServerApp's main: the whole run (`run`), logging one line per round; a failure is also
    written to the output folder, where the launcher waits for it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "transformers", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(grid, context.run_config)
    except BaseException:
        out = context.run_config.get(OUTPUT_KEY)
        if out:  # the launcher waits on the output folder: tell it the run failed, and why
            Path(str(out)).mkdir(parents=True, exist_ok=True)
            (Path(str(out)) / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        raise


# The apps as objects too (`fedlora.flower.apps:server_app`, `:client_app`), for a pyproject that
# names them directly; `fedlora flower app` writes editable server_app.py/client_app.py instead.
client_app = ClientApp()
client_app.query()(query)
client_app.train()(train)
client_app.evaluate()(evaluate)
server_app = ServerApp()
server_app.main()(serve)


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.3) -> list[Message]:
    """Grid.send_and_receive with a short poll (Flower's sleeps 3 s between pulls): push, then pull
    until every reply is in or `timeout` seconds passed. Returns the replies that came."""
    if not messages:  # e.g. a Poisson-sampled round that drew nobody
        return []
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll)
    return replies


def _by_node(grid: Grid, contents: dict[int, RecordDict], kind: str, group: str,
             timeout: float) -> dict[int, RecordDict]:
    """Send contents[node] to each node; the good replies' content by node id."""
    messages = [Message(content, dst_node_id=node, message_type=kind, group_id=group)
                for node, content in contents.items()]
    out = {}
    for reply in _send_and_receive(grid, messages, timeout):
        if reply.has_error():
            log.warning("%s: node %s failed: %s", kind, reply.metadata.src_node_id, reply.error.reason)
        else:
            out[reply.metadata.src_node_id] = reply.content
    return out


def _exchange(grid: Grid, contents: dict[int, RecordDict], node_of: dict[int, int], kind: str,
              group: str, timeout: float) -> dict[int, RecordDict]:
    """Send one message per client, wait (at most `timeout` s), return the good replies by client."""
    cid_of = {node: cid for cid, node in node_of.items()}
    replies = _by_node(grid, {node_of[cid]: c for cid, c in contents.items()}, kind, group, timeout)
    return {cid_of[node]: content for node, content in replies.items() if node in cid_of}


def _wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {min_nodes} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def _claims(coord: Coordinator, replies: dict[int, RecordDict]) -> dict[int, int]:
    """client id -> node id from the replies' `partition-id` claims (in arrival order: the first
    node to claim an id holds it). Bad claims go to the coordinator, counted in round 1's row."""
    claims = Claims(coord.num_clients)
    for node, content in replies.items():
        claims.add(node, content)
    coord.node_rejections += claims.rejected
    return claims.node_of


def _discover(grid: Grid, coord: Coordinator, nodes: list[int], timeout: float) -> dict[int, int]:
    """client id -> Flower node id, by asking every connected node which partition it holds."""
    return _claims(coord, _by_node(grid, {node: RecordDict() for node in nodes}, MessageType.QUERY, "0", timeout))


Exchange = Callable[[dict[int, RecordDict], str, str], dict[int, RecordDict]]
"""(content per client id, message type, group id) -> the good replies' content per client id."""


def drive(coord: Coordinator, node_of: dict[int, int], exchange: Exchange,
          first: dict[int, RecordDict] | None = None, first_seconds: float = 0.0,
          on_round: Callable[[Coordinator], None] | None = None) -> Coordinator:
    """The rounds after `coord.state.round` (0, or a resumed checkpoint's): train the sampled
    clients, aggregate, evaluate every client on schedule, then `on_round(coord)` (the checkpoint).
    Stops early, as the simulator does, before a round that would pass dp.target_epsilon.
    `first`: round 1's train replies when they came already (the broadcast in `run`, which took
    `first_seconds`, counted in round 1's time)."""
    rounds = coord.cfg.fl.rounds
    for r in range(coord.state.round + 1, rounds + 1):
        if coord.would_exceed_epsilon():
            break
        started = time.perf_counter() - (first_seconds if r == 1 else 0.0)
        if r == 1 and first is not None:
            sampled, replies = coord.sample(1), first
        else:
            sampled = [cid for cid in coord.sample(r) if cid in node_of]
            replies = exchange({cid: coord.train_content(r, cid) for cid in sampled}, MessageType.TRAIN, str(r))
        train_rows = coord.absorb_train(r, sampled, replies)
        eval_rows = []
        if coord.evaluate_now(r):
            scored = exchange({cid: coord.evaluate_content(cid) for cid in sorted(node_of)},
                              MessageType.EVALUATE, str(r))
            eval_rows = coord.absorb_eval(scored, train_rows[-1])
        server = train_rows[-1]
        server["time_flower_round"] = round(time.perf_counter() - started, 4)
        new_rows = merge_round_rows(train_rows, eval_rows, r, coord.method.name)
        if coord.client_task:  # several sources: a row says its client's task (no global rows: no data here)
            tag_clients(new_rows, coord.client_task)
        coord.rows += new_rows
        # One line per round in the ServerApp's log (`flwr log`, `flwr run --stream`): the simulator's
        # round line (loss, accuracy when scored, bytes, seconds) and what the server took and refused.
        log.info("%s | %d of %d updates, %d rejected%s", round_line(coord.method.name, r, new_rows),
                 server["replies"], len(sampled), server["num_rejected"], " (skipped)" if server["skipped"] else "")
        if on_round is not None:
            on_round(coord)
    return coord


def run(grid: Grid, run_config) -> Coordinator:
    """The whole run over a Flower Grid: open the run directory (or resume it), find the nodes,
    drive the rounds with a checkpoint after each, write the run directory (flower/rundir.py).

    Which node holds which client id is learnt from replies. When round 1 sends every client the
    same bytes (all sampled, a client-independent download: FedIT and most methods), round 1 is
    broadcast and its replies say who is who; otherwise (or when resuming) a `query` message asks
    first. Either way the nodes do exactly the same training.
    """
    started_run = time.perf_counter()
    cfg = run_config_of(run_config)
    timeout = float(run_config.get(TIMEOUT_KEY, 600))
    n = federation_size(cfg)
    coord = Coordinator(cfg)
    out = str(run_config.get(OUTPUT_KEY) or "")
    folder = Path(out) if out else None
    resume = str(run_config.get(RESUME_KEY, False)).lower() == "true"  # a TOML bool, or the string a user typed
    if resume and folder is None:
        raise ValueError(f"{RESUME_KEY}=true needs the {OUTPUT_KEY!r} of the run to continue")
    ckpt = open_run_dir(folder, cfg, resume) if folder is not None else None
    if ckpt is not None:
        coord.restore(ckpt)
    nodes = _wait_for_nodes(grid, int(run_config.get(MIN_NODES_KEY, n)), timeout)
    broadcast = coord.broadcast_content(1) if len(nodes) == n and coord.state.round == 0 else None
    first, started = None, time.perf_counter()
    if broadcast is not None:
        replies = _by_node(grid, {node: broadcast for node in nodes}, MessageType.TRAIN, "1", timeout)
        node_of = _claims(coord, replies)
        first = {cid: replies[node] for cid, node in node_of.items()}
    else:
        node_of = _discover(grid, coord, nodes, timeout)
    absent = sorted(set(range(n)) - set(node_of))
    if absent:
        log.warning("no SuperNode answered for partitions %s; they count as dropped when sampled", absent)
    exchange = lambda contents, kind, group: _exchange(grid, contents, node_of, kind, group, timeout)  # noqa: E731
    save = (lambda c: checkpoint_round(folder, c)) if folder is not None and cfg.fl.checkpoint else None
    drive(coord, node_of, exchange, first, time.perf_counter() - started if first is not None else 0.0, save)
    if folder is not None:
        finish_run_dir(folder, coord, time.perf_counter() - started_run)
    return coord
