"""fedlora over Flower: the same methods, real SuperLink and SuperNodes, equal to the simulator.

Layers:
- in-process: the ServerApp's round loop (`apps.drive`) over `Coordinator` and `Node` objects,
  messages handed over directly; checks bitwise equality with `Simulator` (FedIT, FedSA-LoRA with
  its B kept on the nodes), a dropped node, and payload validation on both sides;
- end to end: `flower-superlink`, two `flower-supernode` processes and `flwr run` on loopback
  (the deployment engine, subprocess isolation), compared with the simulator.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import make_config, strip_times  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora import PayloadError, prepare  # noqa: E402
from fedlora.fl.engine import Simulator  # noqa: E402
from fedlora.fl.payload import encode  # noqa: E402
from fedlora.flower.apps import drive  # noqa: E402
from fedlora.flower.config import (CONFIG_KEY, config_from_text, config_from_values, config_to_text,  # noqa: E402
                                   node_selection, run_config_of, run_config_values)
from fedlora.flower.coordinator import Coordinator  # noqa: E402
from fedlora.flower.deploy import LocalDeployment, write_app  # noqa: E402
from fedlora.flower.node import STATE_KEY, Node, node_for  # noqa: E402
from fedlora.flower.wire import PAYLOAD, RECORD  # noqa: E402
from fedlora.jsonio import read_jsonl  # noqa: E402

# Flower has no global test set (the server holds no data), so the simulator runs without one.
FLOWER_OVERRIDES = ("fl.eval_every=0", "eval.global_test=false")
SERVER_KEYS = ("sampled", "bytes_up", "bytes_down", "rejected", "num_rejected", "replies", "skipped")


def _simulate(cfg, method):
    return Simulator(prepare(cfg), method).run()


def _in_process(cfg, drop: frozenset[int] = frozenset()):
    """The ServerApp's loop with every node in this process, all sharing one Site (one model, as
    in a Ray actor of Flower's simulation); clients in `drop` never reply."""
    coord = Coordinator(cfg)
    n = cfg.partition.num_clients
    nodes = {i: node_for(run_config_values(cfg), {"partition-id": i, "num-partitions": n}) for i in range(n)}
    assert len({id(node.site) for node in nodes.values()}) == 1
    states = {i: RecordDict() for i in nodes}

    def exchange(contents, kind, group):
        return {cid: getattr(nodes[cid], kind)(content, states[cid])
                for cid, content in contents.items() if cid not in drop}

    drive(coord, {i: 1000 + i for i in range(n)}, exchange)
    return coord, nodes, states


def assert_rows_match(flower_rows, sim_rows):
    """Client rows identical (losses, bytes, test metrics); server rows on the keys both report."""
    fl, sim = strip_times(flower_rows), strip_times(sim_rows)
    assert [r for r in fl if r["client"] != "server"] == [r for r in sim if r["client"] != "server"]
    fs, ss = [r for r in fl if r["client"] == "server"], [r for r in sim if r["client"] == "server"]
    assert len(fs) == len(ss)
    for a, b in zip(fs, ss):
        assert {k: a[k] for k in SERVER_KEYS} == {k: b[k] for k in SERVER_KEYS}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "adapters differ"


# --- in process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("fedit", ()), ("fedsa", ()),
                                          ("fedtree", ("fl.rounds=3", "fl.method_args={tau: -1.0}")),
                                          ("flora", ("fl.rounds=3", "fl.eval_every=1")),
                                          ("flora", ("fl.rounds=4", "fl.client_fraction=0.5")),
                                          ("fedit", ("dp.enabled=true", "dp.noise_multiplier=0.5")),
                                          ("fedit", ("dp.enabled=true", "fl.client_fraction=0.5", "fl.rounds=4")),
                                          ("fedit", ("robust.aggregator=[trimmed_mean]", "robust.f=1")),
                                          ("cuma", ("cuma.experts=3", "cuma.profile_source=client")),
                                          ("cuma", ("cuma.experts=3", "cuma.profile_source=client",
                                                    "fl.method_args={cuma: {personal_routers: true}}")),
                                          ("cuma", ("cuma.experts=3", "cuma.profile_source=client",
                                                    "fl.method_args={cuma: {expert_weights: routing_mass}}"))])
def test_in_process_equals_simulator(method, extra):
    """The Coordinator runs the simulator's own ServerRuntime: sampling (Poisson with DP), schema
    validation, and the combine chain (DP-FedAvg, robust chains) give bitwise the simulator's run."""
    cfg = make_config(f"fl.method={method}", *FLOWER_OVERRIDES, *extra)
    ref = _simulate(cfg, method)
    coord, _, states = _in_process(cfg)
    assert_same(coord.state.server, ref.state.server)
    assert_rows_match(coord.rows, ref.rows)
    if method in ("fedsa", "fedtree") or "personal_routers" in str(extra):
        # B (FedSA), the lambdas (FedTreeLoRA) or CuMA's personal routers stayed on the node
        for cid, state in states.items():
            assert STATE_KEY in state
            kept = Node(cfg, {"partition-id": cid}).load_state(state)
            assert_same(kept, ref.state.clients[cid])
            assert method != "fedtree" or any(k.endswith("mix_logit") for k in kept), "no mixed layer"
            assert method != "cuma" or (kept and all("cuma_router_" in k or k.startswith("cuma_proj") for k in kept))


def test_flora_node_that_missed_rounds_gets_the_whole_delta():
    """FLoRA's nodes merge every round's stack into their own base. A node that missed two (here:
    away in rounds 2 and 3) is sent the whole delta D with its next message and then holds exactly
    the server's D; a node one stack behind gets that stack; the others get nothing extra."""
    cfg = make_config("fl.method=flora", "fl.rounds=4", "fl.eval_every=1", *FLOWER_OVERRIDES[1:])
    coord = Coordinator(cfg)
    nodes = {i: Node(cfg, {"partition-id": i}) for i in range(3)}
    states = {i: RecordDict() for i in nodes}
    sent = []

    def exchange(contents, kind, group):
        sent.extend((group, kind, cid, sorted(k for k in c[RECORD] if k.startswith("base-")))
                    for cid, c in contents.items())
        away = {1} if group in ("2", "3") else set()
        return {cid: getattr(nodes[cid], kind)(c, states[cid]) for cid, c in contents.items() if cid not in away}

    drive(coord, {i: 1000 + i for i in range(3)}, exchange)
    assert (("4", "train", 1, ["base-full", "base-version"]) in sent
            and ("4", "train", 0, ["base-version"]) in sent and ("4", "evaluate", 0, ["base-stack", "base-version"]) in sent)
    assert [r["dropped"] for r in coord.rows if r["client"] == "server"] == [[], [1], [1], []]
    assert coord.base_version == 4
    for cid, node in nodes.items():
        delta, version = node._base_of(states[cid])
        assert version == 4
        assert_same({m + ".delta": d for m, d in delta.items()},
                    {k: v for k, v in coord.state.server.items() if k.endswith(".delta")})


def test_flora_node_behind_without_the_delta_fails_clearly():
    cfg = make_config("fl.method=flora", *FLOWER_OVERRIDES)
    node = Node(cfg, {"partition-id": 0})
    record = ConfigRecord({"base-version": 2})
    with pytest.raises(ValueError, match="holds base version 0 but the server is at 2"):
        node._sync_base(record, None, RecordDict())


def test_dropped_node_round_completes():
    """A node that never answers is 'dropped'; the others' mean is the new server state."""
    cfg = make_config(*FLOWER_OVERRIDES)
    coord, _, _ = _in_process(cfg, drop=frozenset({1}))
    servers = [r for r in coord.rows if r["client"] == "server"]
    assert [s["dropped"] for s in servers] == [[1], [1]]
    assert [s["replies"] for s in servers] == [2, 2]
    assert {r["client"] for r in coord.rows if r.get("split") == "test"} == {0, 2}
    assert all(torch.isfinite(v).all() for v in coord.state.server.values())


def test_bad_upload_is_rejected_not_aggregated():
    cfg = make_config(*FLOWER_OVERRIDES)
    coord = Coordinator(cfg)
    node = Node(cfg, {"partition-id": 0})
    good = node.train(coord.train_content(1, 0), RecordDict())
    tensors = {k: v.clone() for k, v in coord.state.server.items()}
    tensors[next(iter(tensors))][0, 0] = float("nan")
    bad = RecordDict({RECORD: ConfigRecord({**dict(good[RECORD]), PAYLOAD: encode(
        tensors, {"num_examples": 5}, round_index=1, client_id=0)})})
    wrong_sender = RecordDict({RECORD: ConfigRecord({**dict(good[RECORD]), PAYLOAD: encode(
        coord.state.server, {"num_examples": 5}, round_index=1, client_id=2)})})
    before = {k: v.clone() for k, v in coord.state.server.items()}
    rows = coord.absorb_train(1, [0, 1], {0: bad, 1: wrong_sender})
    assert rows[-1]["rejected"] == [0, 1] and rows[-1]["skipped"]
    assert_same(coord.state.server, before)


def test_node_rejects_unknown_download():
    cfg = make_config(*FLOWER_OVERRIDES)
    node = Node(cfg, {"partition-id": 0})
    content = RecordDict({RECORD: ConfigRecord({PAYLOAD: encode({"evil": torch.zeros(3)}), "server-round": 1})})
    with pytest.raises(PayloadError):
        node.train(content, RecordDict())
    not_safetensors = RecordDict({RECORD: ConfigRecord({PAYLOAD: b"\x80\x04pickle", "server-round": 1})})
    with pytest.raises(PayloadError):
        node.train(not_safetensors, RecordDict())


def test_node_config_and_app_folder(tmp_path):
    cfg = make_config()
    assert config_from_text(config_to_text(cfg)) == cfg
    assert node_selection({"partition-id": 2, "num-partitions": 3}, cfg) == (2, cfg)
    with pytest.raises(ValueError, match="num-partitions"):
        node_selection({"partition-id": 0, "num-partitions": 4}, cfg)
    with pytest.raises(ValueError, match="partition-id=3"):
        node_selection({"partition-id": 3}, cfg)
    cid, own = node_selection({"partition-id": 1, "data-path": "/data/site.csv"}, cfg)
    assert cid == 1 and own.data.source == "/data/site.csv" and own.partition.num_clients == 1


@pytest.mark.parametrize("name", ["tiny", "demo", "generation_tiny", "robustness_tiny", "decentralized_tiny",
                                  "concordia_tiny"])
def test_one_run_config_key_per_hyperparameter_round_trips(name):
    from fedlora.config import load_config

    cfg = load_config(name)
    values = run_config_values(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())  # TOML scalars only
    assert values["fl.rounds"] == cfg.fl.rounds and values["lora.target_modules"] == "[" + ", ".join(cfg.lora.target_modules) + "]"
    assert config_from_values(values) == cfg
    assert run_config_of({CONFIG_KEY: config_to_text(cfg)}) == cfg  # an app written by an earlier fedlora


def test_app_folder_follows_flowers_layout_and_takes_run_config_overrides(tmp_path):
    """The app folder: pyproject.toml with one [tool.flwr.app.config] key per hyperparameter,
    components in the folder's own editable server_app.py/client_app.py. Flower's own functions
    (flatten_dict, parse_config_args, fuse_dicts: what `flwr run --run-config` does) read it and
    apply overrides; fedlora builds the overridden RunConfig from what Flower hands over."""
    import importlib.util
    import tomllib

    from flwr.clientapp import ClientApp
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
    from flwr.serverapp import ServerApp

    cfg = make_config()
    folder = write_app(cfg, tmp_path / "app", tmp_path / "out")
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedlora_app.server_app:app",
                                                            "clientapp": "fedlora_app.client_app:app"}
    defaults = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    assert config_from_values(defaults) == cfg and defaults["output-dir"] == str((tmp_path / "out").absolute())
    overrides = parse_config_args(['fl.rounds=6 fl.method="fedsa" train.lr=0.01 lora.target_modules="[q_proj, k_proj]"'])
    got = run_config_of(fuse_dicts(defaults, overrides))
    assert (got.fl.rounds, got.fl.method, got.train.lr, got.lora.target_modules) == (6, "fedsa", 0.01, ["q_proj", "k_proj"])
    assert got.model == cfg.model and got.data == cfg.data
    for module, kind in (("server_app", ServerApp), ("client_app", ClientApp)):
        spec = importlib.util.spec_from_file_location(module, folder / "fedlora_app" / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        assert isinstance(loaded.app, kind)
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="fl.roundz"):
        config_from_values({**defaults, "fl.roundz": 3})
    with pytest.raises(ConfigError, match="fl.rounds"):
        config_from_values({**defaults, "fl.rounds": "many"})


def test_node_cache_is_keyed_on_model_and_config_not_partition(monkeypatch):
    """One process answering for several partitions (a Ray actor of Flower's simulation) prepares
    the model and data once; another config prepares anew (and drops the previous model)."""
    from fedlora.flower import node as node_module

    calls = []
    real = node_module.prepare
    monkeypatch.setattr(node_module, "prepare", lambda c: calls.append(c) or real(c))
    monkeypatch.setattr(node_module, "_SITES", {})
    monkeypatch.setattr(node_module, "_NODES", {})
    cfg = make_config()
    values = run_config_values(cfg)
    nodes = [node_for(values, {"partition-id": i, "num-partitions": 3}) for i in (0, 1, 2, 1, 0)]
    assert len(calls) == 1 and nodes[0] is nodes[4] and nodes[1] is nodes[3]
    assert [n.cid for n in nodes[:3]] == [0, 1, 2] and len({id(n.site) for n in nodes}) == 1
    assert nodes[0].load_seconds > 0 and nodes[1].load_seconds == 0  # preparation reported once
    node_for(run_config_values(make_config("train.lr=0.01")), {"partition-id": 0})
    assert len(calls) == 2 and len(node_module._SITES) == 1


def test_site_with_its_own_csv(tmp_path):
    """`data-path=...`: the node's own table is all of its data; it trains and replies as client i."""
    from fedlora.data import load_table

    cfg = make_config(*FLOWER_OVERRIDES)
    table = load_table(cfg.data, seed=0)
    frame = table.frame.copy()
    frame["diagnosis"] = [table.classes[k] for k in table.labels]
    frame.iloc[:40].to_csv(tmp_path / "site.csv", index=False)
    site_cfg = make_config(*FLOWER_OVERRIDES, "data.target=diagnosis")
    node = Node(site_cfg, {"partition-id": 2, "data-path": str(tmp_path / "site.csv")})
    assert node.cid == 2 and 0 < node.num_examples < 40
    coord = Coordinator(site_cfg)
    reply = node.train(coord.train_content(1, 2), RecordDict())
    rows = coord.absorb_train(1, [2], {2: reply})
    assert rows[0]["client"] == 2 and not rows[0].get("rejected") and rows[-1]["replies"] == 1


def test_cli_writes_the_app(tmp_path):
    from fedlora.cli import main

    assert main(["flower", "app", "tiny", "--out", str(tmp_path / "app"), "--set", "fl.rounds=3"]) == 0
    assert "\nfl.rounds = 3\n" in (tmp_path / "app" / "pyproject.toml").read_text()


def test_unsupported_settings_fail_early():
    with pytest.raises(ValueError, match="optimizer_state=keep"):
        Coordinator(make_config("train.optimizer_state=keep"))
    for method in ("centralized", "dec_lora"):
        with pytest.raises(ValueError, match="not supported under Flower"):
            Coordinator(make_config(f"fl.method={method}"))


# --- end to end: real processes ------------------------------------------------------------------
@pytest.mark.flower
def test_real_superlink_and_supernodes_match_simulator(tmp_path):
    """flower-superlink + 2 flower-supernode + `flwr run` on loopback: FedIT, tiny model, 2 rounds.

    The final global adapter is bitwise equal to the simulator's (same config and seed: the same
    partition, local seeds and float summation order), and so are every client's losses, test
    metrics and byte counts. All processes are stopped even when the run fails."""
    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    started = time.perf_counter()
    dep = LocalDeployment(cfg, tmp_path / "flower", round_timeout=120)
    with dep:
        out = dep.run_app(timeout=240)
    wall = time.perf_counter() - started
    rows = read_jsonl(out / "metrics.jsonl")  # null (a NaN AUROC) back as NaN
    ref = _simulate(cfg, "fedit")
    peft = load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))  # PEFT's key names
    assert_same({k[len("base_model.model."):-len(".weight")]: v for k, v in peft.items()}, ref.state.server)
    assert_rows_match(rows, ref.rows)
    # Every process we started has exited (SIGTERM: 0 or -15), none was left to SIGKILL.
    assert all(code in (0, -15) for code in dep.exit_codes.values()), dep.exit_codes
    per_round = [r.get("time_flower_round") for r in rows if r["client"] == "server"]
    print(f"flower e2e: {wall:.1f} s wall, rounds {per_round} s")


@pytest.mark.flower
def test_killed_supernode_run_completes_without_it(tmp_path):
    """SIGKILL one SuperNode (and its ClientApp) after it sent its round-1 update: round 2 waits at
    most round-timeout for it, records it as dropped, aggregates the other node's update, and the
    run finishes; nothing hangs and every process is stopped."""
    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    dep = LocalDeployment(cfg, tmp_path / "flower", round_timeout=60)
    victim_log = tmp_path / "flower" / "logs" / "supernode-1.log"
    killed = []

    def kill_after_first_update():
        text = victim_log.read_text() if victim_log.exists() else ""
        sent = text.find("Sending: train message")
        if not killed and sent >= 0 and "Sent successfully" in text[sent:]:
            dep.kill_node(1)
            killed.append(time.perf_counter())

    with dep:
        out = dep.run_app(timeout=300, on_wait=kill_after_first_update)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    servers = [r for r in rows if r["client"] == "server"]
    assert killed and servers[0]["dropped"] == [] and servers[1]["dropped"] == [1]
    assert servers[1]["replies"] == 1 and not servers[1]["skipped"]
    assert [r["client"] for r in rows if r.get("split") == "test"] == [0]
    assert load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))


def test_cli_flower_refusals(tmp_path, capsys):
    """Flag combinations that cannot work fail before any process starts, saying why."""
    from fedlora.cli import main

    cases = [(["flower", "local", "tiny", "--resume"], "give its working folder as --out"),
             (["flower", "local", "tiny", "--resume", "--out", str(tmp_path / "nothing")], "holds no checkpoints"),
             (["flower", "simulate", "tiny", "--secure"], "a simulation has no transport"),
             (["flower", "simulate", "tiny", "--resume", "--out", str(tmp_path)], "continues a `fedlora flower local` run")]
    for args, message in cases:
        assert main(args) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
