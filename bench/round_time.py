"""Per-round time of FedIT split into phases, and the federation overhead's share of a round.

The simulator times five phases per round (summed over the round's clients): local training,
adapter swapping (tensor copies into and out of the shared model), payload serialization
(safetensors encode + decode, both directions), aggregation and evaluation. Their sum is compared
with the wall-clock time of the round; "other" is the difference (client sampling, bookkeeping).

    python bench/round_time.py --models tiny,smollm2-135m --rounds 3 --write

Round 1 carries one-off warm-up costs (first forward/backward, allocator growth), so the table
shows both the mean over all rounds and the median over rounds 2..N.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fedlora
from fedlora.model.lora import adapter_parameters

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PHASES = ["train", "swap", "serialize", "aggregate", "eval"]
OVERHEAD = ["swap", "serialize", "aggregate"]
MEAN_COLUMNS = ["mean radius", "mean texture", "mean perimeter", "mean area", "mean smoothness",
                "mean compactness", "mean concavity", "mean concave points", "mean symmetry",
                "mean fractal dimension"]


def overrides(model: str, rounds: int) -> list[str]:
    return [f"model.name={model}", "data.source=breast-cancer",
            "data.columns=[" + ", ".join(MEAN_COLUMNS) + "]",
            "partition.scheme=iid", "partition.num_clients=4", "train.batch_size=8",
            "train.local_steps=2", f"fl.rounds={rounds}", "fl.eval_every=1", "eval.max_examples=16"]


def measure(model: str, rounds: int) -> dict:
    """Run FedIT once; return per-round phase seconds, wall seconds and payload sizes."""
    cfg = fedlora.load_config(None, overrides(model, rounds))
    started = time.perf_counter()
    fed = fedlora.prepare(cfg)
    prepare_s = time.perf_counter() - started
    stamps = [time.perf_counter()]
    on_round = lambda r, rows: stamps.append(time.perf_counter())  # noqa: E731
    result = fedlora.Simulator(fed, "fedit", on_round=on_round).run()
    server = [r for r in result.rows if r["client"] == "server"]
    clients = [r for r in result.rows if isinstance(r["client"], int) and "bytes_up" in r]
    numel = sum(p.numel() for p in adapter_parameters(fed.model).values())
    return {
        "model": model, "prepare_s": prepare_s, "lora_numel": numel,
        "rounds": [{**{p: r.get(f"time_{p}", 0.0) for p in PHASES}, "wall": b - a}
                   for r, a, b in zip(server, stamps, stamps[1:])],
        "bytes_up": sorted({r["bytes_up"] for r in clients}),
        "bytes_down": sorted({r["bytes_down"] for r in clients}),
    }


def summarize(m: dict) -> tuple[list[list[str]], dict]:
    """Table rows (phase, mean s, mean %, median s, median %) and the overhead shares."""
    rounds = m["rounds"]
    later = rounds[1:] or rounds
    stats = {}
    for key in PHASES + ["wall"]:
        stats[key] = (statistics.mean(r[key] for r in rounds), statistics.median(r[key] for r in later))
    stats["other"] = tuple(stats["wall"][i] - sum(stats[p][i] for p in PHASES) for i in (0, 1))
    wall = stats["wall"]
    rows = [[name, f"{s[0]:.4f}", f"{100 * s[0] / wall[0]:.1f}", f"{s[1]:.4f}", f"{100 * s[1] / wall[1]:.1f}"]
            for name, s in ((k, stats[k]) for k in PHASES + ["other"])]
    over = tuple(sum(stats[p][i] for p in OVERHEAD) for i in (0, 1))
    rows.append(["**overhead** (swap + serialize + aggregate)", f"{over[0]:.4f}",
                 f"{100 * over[0] / wall[0]:.2f}", f"{over[1]:.4f}", f"{100 * over[1] / wall[1]:.2f}"])
    rows.append(["**round (wall clock)**", f"{wall[0]:.4f}", "100", f"{wall[1]:.4f}", "100"])
    return rows, {"mean": 100 * over[0] / wall[0], "median": 100 * over[1] / wall[1]}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine_info() -> str:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    cpu = cpu.split(":", 1)[-1].strip() or "unknown"
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    from fedlora.model.precision import cpu_has_fast_bf16

    # Hosts of one name differ: bf16 units decide model.precision=auto and fp32 speed (AVX-512).
    cpu += f" ({torch.backends.cpu.get_cpu_capability()}, bf16 units: {'yes' if cpu_has_fast_bf16() else 'no'})"
    return (f"- CPU: {cpu}, `nproc` = {nproc}\n- GPU: {gpu}\n- torch {torch.__version__}, "
            f"`torch.get_num_threads()` = {torch.get_num_threads()}\n- fedlora {fedlora.__version__}")


def write_section(name: str, title: str, body: str) -> None:
    """Replace the text between this benchmark's markers in docs/benchmarks.md (append if absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    DOC.write_text(text, encoding="utf-8")


def report(results: list[dict], command: str, load: tuple[float, float]) -> str:
    parts = [f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d')}; 1-minute load average "
             f"{load[0]:.2f} before, {load[1]:.2f} after (2 cores; this run adds about 1, so well above 1 "
             "means another process shared the CPU). FedIT, breast-cancer (10 `mean ...` columns), "
             "4 IID clients, batch 8, 2 local steps, LoRA r=8 on q_proj/v_proj, evaluation every round "
             "on at most 16 examples per split. Times are seconds per round, summed over clients; "
             "% is of the round's wall-clock time; medians skip round 1 (warm-up)."]
    header = ["phase", "mean s", "mean %", "median s (r≥2)", "median % (r≥2)"]
    for m in results:
        rows, _ = summarize(m)
        up = ", ".join(str(b) for b in m["bytes_up"])
        parts.append(f"**{m['model']}** — {len(m['rounds'])} rounds; prepare() {m['prepare_s']:.1f} s; "
                     f"LoRA parameters {m['lora_numel']:,} ({4 * m['lora_numel']:,} bytes fp32); "
                     f"upload per client {up} bytes\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = [measure(m, args.rounds) for m in args.models.split(",")]
    command = f"python bench/round_time.py --models {args.models} --rounds {args.rounds}" + (
        " --write" if args.write else "")
    text = report(results, command, (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section("machine", "Machine", machine_info())
        write_section("round_time", "Round time: where a FedIT round goes", text)


if __name__ == "__main__":
    main()
