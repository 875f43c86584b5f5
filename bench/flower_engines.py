"""Three engines on the same run, side by side: fedlora's simulator, Flower's simulation engine
(Ray, `fedlora flower simulate`) and a real local Flower deployment (`fedlora flower local`:
SuperLink + one SuperNode process per client, subprocess isolation).

Each engine runs as its own process tree, one after the other, on the same config and seed
(FedIT, no mid-run evaluation, no global test: Flower's server holds no data). Measured per run:
wall time of the whole command (start-up included), the first round, the steady round (median
of rounds 2 .. R-1: no start-up, no final evaluation), the slowest node's preparation (model and
data load) in those rounds, and peak memory of the whole process tree as the sum of PSS
(proportional set size: shared pages counted once across processes; sampled every second).

    python bench/flower_engines.py --write        # about 15 minutes on 2 idle cores

Settings: tiny model at 4 and 16 clients (4 rounds), SmolLM2-135M at 4 clients (3 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_time import machine_info, markdown_table, write_section  # noqa: E402

from fedlora.jsonio import read_jsonl  # noqa: E402

FEDLORA = str(Path(sys.executable).parent / "fedlora")
COMMON = ["fl.method=fedit", "fl.eval_every=0", "eval.global_test=false"]
SETTINGS = {  # name -> (config, overrides): tiny model at 4 and 16 clients, SmolLM2-135M at 4
    "tiny-4": ("tiny", ["partition.num_clients=4", "fl.rounds=4"]),
    "tiny-16": ("tiny", ["partition.num_clients=16", "fl.rounds=4", "data.max_rows=640"]),
    "smollm2-4": ("demo", ["partition.num_clients=4", "fl.rounds=3", "eval.max_examples=16"]),
}
ENGINES = ("simulator", "flower simulate (Ray)", "flower local")
RESULTS = Path(__file__).resolve().parent / "results" / "flower_engines.json"


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of RSS minus file-backed shared pages) over `root` and its descendants."""
    rss = anon = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            mem = proc.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, anon = rss + mem.rss, anon + mem.rss - getattr(mem, "shared", 0)
    return rss, anon


def _run(args: list[str], log: Path) -> tuple[float, int, int]:
    """Run `args`, sampling the tree's memory; (wall seconds, peak resident, peak anonymous bytes)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        root, peak, peak_anon = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            rss, anon = _tree_memory(root)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started, peak, peak_anon


def _round_seconds(rows: list[dict], engine: str) -> list[float]:
    servers = [r for r in rows if r["client"] == "server"]
    if engine == "simulator":  # the simulator times every section of its round body
        return [sum(v for k, v in r.items() if k.startswith("time_")) for r in servers]
    return [r["time_flower_round"] for r in servers]


def run_engine(engine: str, config: str, overrides: list[str], work: Path) -> dict:
    sets = [x for o in [*COMMON, *overrides, f"output_dir={work / 'runs'}"] for x in ("--set", o)]
    if engine == "simulator":
        args = [FEDLORA, "run", config, "--quiet", *sets]
    else:
        action = "simulate" if engine.startswith("flower simulate") else "local"
        args = [FEDLORA, "flower", action, config, "--out", str(work / action), "--round-timeout", "1200", *sets]
    wall, peak, peak_anon = _run(args, work / f"{engine.split()[0]}-{engine.split()[-1]}.log")
    if engine == "simulator":
        metrics = next((work / "runs").rglob("metrics.jsonl"))
    else:
        metrics = work / ("simulate" if "simulate" in engine else "local") / "output" / "metrics.jsonl"
    rows = read_jsonl(metrics)
    rounds = _round_seconds(rows, engine)
    servers = [r for r in rows if r["client"] == "server"]
    steady = rounds[1:-1] or rounds[-1:]
    prepare = [r.get("time_node_prepare", 0.0) for r in servers[1:-1]] if engine != "simulator" else []
    return {"engine": engine, "wall": wall, "first": rounds[0], "steady": statistics.median(steady),
            "prepare": max(prepare) if prepare else None, "peak_gib": peak / 2**30,
            "anon_gib": peak_anon / 2**30, "rounds": rounds, "date": time.strftime("%Y-%m-%d")}


def report(results: dict[str, list[dict]], command: str) -> str:
    header = ["setting", "engine", "wall s", "round 1 s", "steady round s", "x simulator",
              "node prepare s (steady)", "peak resident GiB", "peak anonymous GiB"]
    rows = []
    for setting, runs in results.items():
        base = runs[0]["steady"]
        for r in runs:
            rows.append([setting, r["engine"], f"{r['wall']:.1f}", f"{r['first']:.1f}", f"{r['steady']:.2f}",
                         f"{r['steady'] / base:.1f}", "-" if r["prepare"] is None else f"{r['prepare']:.2f}",
                         f"{r['peak_gib']:.2f}", f"{r['anon_gib']:.2f}"])
    dates = sorted({r["date"] for runs in results.values() for r in runs})
    return (f"Command: `{command}` (one run per engine and setting, in turn, on a quiet machine; "
            f"run on {', '.join(dates)}).\n\n"
            f"{machine_info()}\n\n{markdown_table(header, rows)}\n\n"
            "Round times per run (seconds): " + "; ".join(
                f"{s} / {r['engine']}: {', '.join(f'{x:.1f}' for x in r['rounds'])}"
                for s, runs in results.items() for r in runs) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    p.add_argument("--render", action="store_true", help="run nothing: the table from the kept results")
    args = p.parse_args()
    results: dict[str, list[dict]] = {}
    if args.render:
        args.settings = ""
    with tempfile.TemporaryDirectory(prefix="fedlora-engines-") as tmp:
        for setting in filter(None, args.settings.split(",")):
            config, overrides = SETTINGS[setting]
            for engine in args.engines.split(","):
                work = Path(tmp) / f"{setting}-{engine}".replace(" ", "_").replace(",", "")
                work.mkdir(parents=True)
                result = run_engine(engine, config, overrides, work)
                print(f"{setting} | {engine}: wall {result['wall']:.1f} s, rounds "
                      f"{[round(x, 1) for x in result['rounds']]}, peak {result['peak_gib']:.2f} GiB", flush=True)
                results.setdefault(setting, []).append(result)
    kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept.update({s: {r["engine"]: r for r in runs} for s, runs in results.items()})  # a rerun replaces
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(kept, indent=1) + "\n")
    ordered = {s: [kept[s][e] for e in ENGINES if e in kept[s]] for s in SETTINGS if s in kept}
    text = report(ordered, "python bench/flower_engines.py" + (" --write" if args.write else ""))
    print(text)
    if args.write:
        write_section("flower_engines", "Engines: simulator, Flower simulation (Ray), Flower deployment", text)


if __name__ == "__main__":
    main()
