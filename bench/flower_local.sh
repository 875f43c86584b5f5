#!/usr/bin/env bash
# fedlora on a real local Flower deployment vs the in-process simulator, same config and seed:
# per-round wall time and bytes on the wire. Starts flower-superlink + N flower-supernode on
# loopback, runs `flwr run`, and stops every process (also on failure).
#
#   bench/flower_local.sh [CLIENTS] [ROUNDS]        # defaults: 3 clients, 3 rounds, configs/tiny.yaml
#
# Results: docs/benchmarks.md ("Flower vs simulator"). Run on an otherwise idle machine.
set -euo pipefail
CLIENTS=${1:-3}
ROUNDS=${2:-3}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedlora-flower-bench.XXXXXX")
"$PY" - "$CLIENTS" "$ROUNDS" "$WORK" <<'PYEOF'
import json, sys, time
from pathlib import Path

import torch

from fedlora import load_config, prepare
from fedlora.fl.engine import Simulator
from fedlora.flower.deploy import LocalDeployment

torch.set_num_threads(1)
clients, rounds, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
cfg = load_config("configs/tiny.yaml", [f"partition.num_clients={clients}", f"fl.rounds={rounds}",
                                         "fl.eval_every=0", "eval.global_test=false", f"output_dir={work}"])
marks = []
t0 = time.perf_counter()
fed = prepare(cfg)
prep = time.perf_counter() - t0
start = time.perf_counter()
sim = Simulator(fed, "fedit", on_round=lambda r, rows: marks.append(time.perf_counter())).run()
sim_rounds = [b - a for a, b in zip([start] + marks, marks)]
sim_server = [r for r in sim.rows if r["client"] == "server"]

t0 = time.perf_counter()
dep = LocalDeployment(cfg, work / "flower", round_timeout=300)
with dep:
    started = time.perf_counter() - t0
    out = dep.run_app(timeout=3600)
    total = time.perf_counter() - t0
    time.sleep(2)  # let the SuperLink mark the run finished
    info = dep.run_info()
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
fl_server = [r for r in rows if r["client"] == "server"]
fl_rounds = [r["time_flower_round"] for r in fl_server]
print(f"tiny config, {clients} clients, {rounds} rounds, FedIT, OMP_NUM_THREADS=1")
print(f"simulator: prepare {prep:.1f} s; rounds " + ", ".join(f"{s:.2f}" for s in sim_rounds) + " s")
print(f"flower:    processes up {started:.1f} s; whole run incl. flwr run and ServerApp start "
      f"{total:.1f} s; rounds " + ", ".join(f"{s:.2f}" for s in fl_rounds) + " s")
print("bytes per round (payload bytes, both): up " + ", ".join(str(r["bytes_up"]) for r in fl_server)
      + " | simulator " + ", ".join(str(r["bytes_up"]) for r in sim_server))
print("                                      down " + ", ".join(str(r["bytes_down"]) for r in fl_server)
      + " | simulator " + ", ".join(str(r["bytes_down"]) for r in sim_server))
for key in ("time_node_process", "time_node_prepare", "time_node_train"):
    print(f"  {key} (slowest node, per round): " + ", ".join(str(r.get(key, "-")) for r in fl_server) + " s")
traffic = info.get("network-traffic", {})
payload = sum(r["bytes_up"] + r["bytes_down"] for r in fl_server)
print(f"Flower's count for the run (flwr ls network-traffic): {traffic}; fedlora payload bytes {payload}")
print(f"exit codes: {dep.exit_codes}; logs: {work / 'flower' / 'logs'}")
PYEOF
