"""Federations from several sources (data.clients): each client its own file, columns and task.

Tiny model throughout. The federation here: breast-cancer split over two clients (five
measurement columns), a lender's own CSV with its own target and three columns, and the
german-credit-qa generation records on one client: three tasks, two kinds of scoring.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from fedlora import load_config, prepare
from fedlora.config import ConfigError
from fedlora.config.sources import source_specs
from fedlora.data import DataError
from fedlora.experiment import compare, resume, run

BC_COLUMNS = "[mean radius, mean texture, mean perimeter, mean area, mean concave points]"


def _lender_csv(path, n=90, seed=0):
    """A lender's own table: three numeric columns and a target the columns partly explain."""
    rng = np.random.default_rng(seed)
    income = rng.normal(50, 15, n).round(1)
    debt = rng.normal(20, 8, n).round(1)
    age = rng.integers(20, 70, n)
    default = np.where(debt / income + rng.normal(0, 0.1, n) > 0.4, "yes", "no")
    pd.DataFrame({"age": age, "income": income, "debt": debt, "default": default, "branch": "north"}).to_csv(
        path, index=False)
    return path


def _clients(csv, *, generation=True) -> str:
    entries = [f"{{source: breast-cancer, clients: 2, columns: {BC_COLUMNS}}}",
               f"{{source: '{csv}', name: lender, target: default, columns: [age, income, debt]}}"]
    if generation:
        entries.append("{source: german-credit-qa, task: generation, max_rows: 40}")
    return "data.clients=[" + ", ".join(entries) + "]"


def _cfg(tmp_path, *extra, generation=True):
    csv = _lender_csv(tmp_path / "lender.csv")
    return make_config(_clients(csv, generation=generation), "eval.zero_shot=false", "eval.baseline=none",
                       "eval.max_new_tokens=4", *extra, output_dir=tmp_path / "runs")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the spec: errors name the entry and the fix -------------------------------------------------

@pytest.mark.parametrize("clients, match", [
    ("[]", r"data.clients is empty"),
    ("[german-credit]", r"data.clients\[0\]: expected a mapping"),
    ("[{source: german-credit}, {source: breast-cancer, max_length: 64}]",
     r"data.clients\[1\]: unknown key 'max_length'.*belong in the data section"),
    ("[{target: y}]", r"data.clients\[0\]: no source"),
    ("[{source: german-credit, clients: 0}]", r"data.clients\[0\].clients must be an integer >= 1"),
    ("[{source: german-credit, clients: 2, partition: {num_clients: 3}}]",
     r"data.clients\[0\].partition.num_clients: set data.clients\[0\].clients instead"),
    ("[{source: german-credit}, {source: german-credit}]", r"data.clients\[1\]: task name 'german-credit'"),
    ("[{source: german-credit, task: regression}]", r"data.clients\[0\] \(german-credit\): data.task: unknown value .regression"),
    ("[{source: german-credit, clients: 2, partition: {scheme: column}}]", r"scheme=column needs a column"),
])
def test_bad_entries_are_named(clients, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"data.clients={clients}"])


@pytest.mark.parametrize("extra, match", [
    (["fl.method=cuma"], r"cuma"),
    (["concordia.enabled=true"], r"concordia"),
])
def test_refused_combinations_say_why(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.clients=[{source: german-credit}, {source: breast-cancer}]", *extra])


def test_specs_inherit_run_wide_fields_and_number_clients_in_entry_order():
    cfg = load_config(None, ["data.max_length=200", "partition.scheme=dirichlet", "partition.alpha=0.3",
                             "data.clients=[{source: german-credit, clients: 3}, "
                             "{source: breast-cancer, name: hospital, partition: {scheme: iid}, clients: 2}, "
                             "{source: german-credit-qa, task: generation}]"])
    specs = source_specs(cfg)
    assert [(s.name, s.first_client, s.clients) for s in specs] == [
        ("german-credit", 0, 3), ("hospital", 3, 2), ("german-credit-qa", 5, 1)]
    assert all(s.data.max_length == 200 for s in specs)
    assert specs[0].partition.scheme == "dirichlet" and specs[0].partition.alpha == 0.3  # the run's section
    assert specs[1].partition.scheme == "iid"  # the entry's own
    assert specs[2].data.task == "generation" and specs[2].partition.num_clients == 1


def test_bad_source_fails_naming_it_before_any_run_dir(tmp_path):
    csv = _lender_csv(tmp_path / "lender.csv")
    cases = [
        (f"[{{source: breast-cancer}}, {{source: '{tmp_path}/missing.csv', target: default}}]",
         r"data.clients\[1\] \(missing\).*missing.csv"),
        (f"[{{source: breast-cancer}}, {{source: '{csv}', target: outcome}}]", r"data.clients\[1\] \(lender\).*outcome"),
        (f"[{{source: '{csv}', target: default, columns: [age, salary]}}]", r"data.clients\[0\] \(lender\).*salary"),
    ]
    for clients, match in cases:
        cfg = make_config(f"data.clients={clients}", output_dir=tmp_path / "runs")
        with pytest.raises(DataError, match=match):
            run(cfg, quiet=True)
        assert not (tmp_path / "runs").exists()


# --- a real run ---------------------------------------------------------------------------------

def test_federation_keeps_each_source_its_own_columns_and_task(tmp_path):
    fed = prepare(_cfg(tmp_path))
    assert fed.tasks == ["breast-cancer", "lender", "german-credit-qa"]
    assert fed.client_task == ["breast-cancer", "breast-cancer", "lender", "german-credit-qa"]
    assert fed.num_clients == 4 and fed.table is None
    decode = fed.tokenizer.decode
    bc_text = decode(fed.clients[0].train.prompt_ids[0])
    lender_text = decode(fed.clients[2].train.prompt_ids[0])
    assert "mean radius" in bc_text and "income" not in bc_text
    assert "income" in lender_text and "mean radius" not in lender_text and "branch" not in lender_text
    assert fed.parts[1].table.classes == ["no", "yes"] and fed.parts[0].table.classes != fed.parts[1].table.classes
    assert fed.parts[2].table.kind == "generation"


def test_run_reports_per_task_and_overall_then_resumes_to_the_same_rows(tmp_path):
    cfg = _cfg(tmp_path, "run_name=multi", "fl.rounds=2", "train.optimizer_state=keep")
    run_dir = run(cfg, quiet=True)
    rows = _rows(run_dir)
    last = [r for r in rows if r.get("round") == 2]
    by_client = {r["client"]: r for r in last if r.get("split") in ("test", "global_test")}
    assert {by_client[c]["task"] for c in range(4)} == {"breast-cancer", "lender", "german-credit-qa"}
    assert "accuracy" in by_client[2] and "rougeL" in by_client[3] and "accuracy" not in by_client[3]
    per_task = [by_client[f"global:{t}"] for t in ("breast-cancer", "lender", "german-credit-qa")]
    overall = by_client["global"]
    assert overall["accuracy"] == pytest.approx(np.mean([per_task[0]["accuracy"], per_task[1]["accuracy"]]))
    assert overall["rougeL"] == pytest.approx(per_task[2]["rougeL"])  # only the generation task has it
    partition = json.loads((run_dir / "partition.json").read_text())
    clients = partition["clients"] if isinstance(partition, dict) else partition
    assert [c["task"] for c in clients] == ["breast-cancer", "breast-cancer", "lender", "german-credit-qa"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["tasks"]) == {"breast-cancer", "lender", "german-credit-qa"}

    # the newest checkpoint truncated and a half-written row: resume runs round 2 again, same outputs
    from test_checkpoint import _outputs

    from fedlora.fl.checkpoint import round_dir

    expected = _outputs(run_dir)
    state = round_dir(run_dir / "checkpoints", 2) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-7])
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "client": "half-written"}\n')
    assert resume(run_dir, quiet=True) == run_dir
    assert _outputs(run_dir) == expected


def test_compare_writes_per_task_tables(tmp_path):
    cfg = _cfg(tmp_path, "fl.rounds=1", generation=False)
    out = compare(cfg, ["fedit", "local"], seeds=[0], quiet=True)
    text = (out / "comparison.md").read_text()
    assert "breast-cancer" in text and "lender" in text
    tasks = json.loads((out / "comparison_tasks.json").read_text())
    assert set(tasks) >= {"breast-cancer", "lender"}


# --- under Flower: the node reads the same spec ----------------------------------------------------

def test_flower_nodes_read_the_same_spec_and_match_the_simulator(tmp_path):
    from flwr.app import RecordDict
    from test_flower import FLOWER_OVERRIDES, assert_rows_match, assert_same

    from fedlora.config.sources import federation_size
    from fedlora.fl.engine import Simulator
    from fedlora.flower.apps import drive
    from fedlora.flower.config import node_selection, run_config_values
    from fedlora.flower.coordinator import Coordinator
    from fedlora.flower.node import Node, node_for
    from fedlora.flower.rundir import finish_run_dir, open_run_dir

    cfg = _cfg(tmp_path, *FLOWER_OVERRIDES, "fl.rounds=2", generation=False)
    n = federation_size(cfg)
    assert n == 3
    ref = Simulator(prepare(cfg), "fedit").run()
    coord = Coordinator(cfg)
    nodes = {i: node_for(run_config_values(cfg), {"partition-id": i, "num-partitions": n}) for i in range(n)}
    states = {i: RecordDict() for i in nodes}
    drive(coord, {i: 1000 + i for i in range(n)},
          lambda contents, kind, group: {c: getattr(nodes[c], kind)(m, states[c]) for c, m in contents.items()})
    assert_same(coord.state.server, ref.state.server)
    assert_rows_match(coord.rows, ref.rows)
    assert {r["task"] for r in coord.rows if isinstance(r["client"], int)} == {"breast-cancer", "lender"}
    open_run_dir(tmp_path / "flower-out", cfg, resume=False)
    summary = finish_run_dir(tmp_path / "flower-out", coord, 0.0)
    assert set(summary["tasks"]) == {"breast-cancer", "lender"}
    card = json.loads((tmp_path / "flower-out" / "adapters" / "global" / "fedlora.json").read_text())
    assert [s["name"] for s in card["data"]["sources"]] == ["breast-cancer", "lender"]
    assert str(tmp_path) not in json.dumps(card["data"])  # a file by its name, never a host path

    # a site holding its own file: read with its entry's target and columns, all of it one client
    with pytest.raises(ValueError, match="partition-id=3 but the clients of data.clients add up to 3"):
        node_selection({"partition-id": 3}, cfg)
    own = _lender_csv(tmp_path / "my-branch.csv", n=60, seed=1)
    cid, site_cfg = node_selection({"partition-id": 2, "data-path": str(own)}, cfg)
    assert (cid, site_cfg.data.source, site_cfg.data.target) == (2, str(own), "default")
    assert site_cfg.data.columns == ["age", "income", "debt"] and site_cfg.partition.num_clients == 1
    node = Node(cfg, {"partition-id": 2, "data-path": str(own)})
    reply = node.train(coord.train_content(3, 2), RecordDict())
    rows = coord.absorb_train(3, [2], {2: reply})
    assert rows[0]["client"] == 2 and not rows[0].get("rejected")


def test_gossip_trains_and_scores_every_source_without_global_rows(tmp_path):
    from fedlora.fl.gossip import GossipSimulator

    cfg = _cfg(tmp_path, "topology.graph=erdos_renyi", "topology.p=0.5", "fl.rounds=2", generation=False)
    result = GossipSimulator(prepare(cfg), "dec_lora", seed=0).run()
    scored = [r for r in result.rows if r.get("split") == "test" and r.get("round") == 2]
    assert sorted(r["client"] for r in scored) == [0, 1, 2]
    assert [r["task"] for r in sorted(scored, key=lambda r: r["client"])] == ["breast-cancer", "breast-cancer", "lender"]
    assert not any(str(r["client"]).startswith("global") for r in result.rows)


def test_shipped_multi_task_config_loads_every_source_offline():
    from fedlora.fl.sources import load_sources

    cfg = load_config("multi_task")
    specs = source_specs(cfg)
    assert [s.name for s in specs] == ["german-credit", "breast-cancer", "wine", "penguins"]
    assert sum(s.clients for s in specs) == 10
    tables = load_sources(cfg)
    assert [len(t.classes) for t in tables] == [2, 2, 3, 3]
    assert all(t.license for t in tables)


# --- in Python: a DataFrame or a datasets.Dataset as a source ----------------------------------

def test_dataframe_and_dataset_sources_run_and_never_reach_the_run_dir(tmp_path):
    import datasets
    import yaml

    from fedlora import with_sources

    lender = pd.read_csv(_lender_csv(tmp_path / "lender.csv"))
    before = lender.copy()
    records = pd.DataFrame({"prompt": [f"What is {a} plus {b}?" for a, b in zip(range(30), range(30, 60))],
                            "response": [str(a + b) for a, b in zip(range(30), range(30, 60))]})
    cfg = with_sources(make_config("eval.zero_shot=false", "eval.baseline=none", "eval.max_new_tokens=3",
                                   "fl.rounds=1", "run_name=frames", output_dir=tmp_path / "runs"),
                       [{"source": lender, "name": "bank", "target": "default", "columns": ["age", "income", "debt"],
                         "clients": 2, "partition": {"scheme": "iid"}},
                        {"source": datasets.Dataset.from_pandas(records), "name": "sums", "task": "generation"}])
    run_dir = run(cfg, quiet=True)
    pd.testing.assert_frame_equal(lender, before)  # the caller's frame is untouched
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    labels = [e["source"] for e in saved["data"]["clients"]]
    assert labels[0].startswith("memory:DataFrame 90x5 sha256:") and labels[1].startswith("memory:Dataset 30x2")
    rows = _rows(run_dir)
    assert {r["task"] for r in rows if r.get("split") == "test"} == {"bank", "sums"}
    assert "income" not in (run_dir / "config.yaml").read_text().split("columns")[0]  # no rows, only names
    with pytest.raises(DataError, match=r"data.clients\[0\] \(bank\) was a DataFrame given in Python.*to_parquet"):
        resume(run_dir, quiet=True)  # the rows are not in the run directory: said, not a crash


def test_bad_dataframe_source_is_named(tmp_path):
    from fedlora import with_sources
    from fedlora.flower.config import run_config_values

    frame = pd.DataFrame({"x": [1, 2, 3, 4] * 10, "y": ["a", "b"] * 20})
    cfg = with_sources(make_config(output_dir=tmp_path / "runs"), [{"source": frame, "target": "label"}])
    with pytest.raises(DataError, match=r"data.clients\[0\] \(frame-0\): the DataFrame: target column 'label' "
                                        r"not found; available columns: x, y"):
        run(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=r"data.clients\[0\] is a DataFrame given in Python; Flower nodes read files"):
        run_config_values(cfg)
