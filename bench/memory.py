"""Resident memory (RSS) of the simulator as the number of clients grows, on the tiny model.

Each client count runs in a fresh subprocess, so one measurement never inherits another's heap.
A child reads VmRSS from /proc/self/status after imports, after `prepare()` and after one FedIT
round in which every client trains with `train.optimizer_state=keep` (each client's AdamW moments
stay in memory), and VmHWM (peak RSS). The data is a synthetic table with a fixed number of rows,
so the total number of training rows is the same at every client count; only how it is split
changes.

    python bench/memory.py --clients 2,8,32,128 --write
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, FEATURES = 6000, 6


def rss_mib(field: str = "VmRSS") -> float:
    """RSS in MiB, after a garbage collection and glibc's malloc_trim (which hands freed heap pages
    back to the OS, so transient peaks such as batch tokenization do not linger in the reading)."""
    if field == "VmRSS":
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def write_table(folder: Path) -> Path:
    import pandas as pd
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=ROWS, n_features=FEATURES, n_informative=4, random_state=0)
    frame = pd.DataFrame(x.round(3), columns=[f"x{i}" for i in range(FEATURES)])
    frame["label"] = ["yes" if v else "no" for v in y]
    path = folder / "synthetic.csv"
    frame.to_csv(path, index=False)
    return path


def child(clients: int, csv: str) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    import fedlora
    from fedlora.model.lora import adapter_parameters

    rss = {"import": rss_mib()}
    cfg = fedlora.load_config(None, [
        "model.name=tiny", f"data.source={csv}", "data.target=label", "partition.scheme=iid",
        f"partition.num_clients={clients}", "partition.min_rows=5", "train.batch_size=8",
        "train.local_steps=2", "train.optimizer_state=keep", "fl.rounds=1", "eval.max_examples=16"])
    fed = fedlora.prepare(cfg)
    rss["prepare"] = rss_mib()
    result = fedlora.Simulator(fed, "fedit").run()
    rss["peak"] = rss_mib("VmHWM")  # read first: the trim in the next reading cannot lower a peak
    rss["round"] = rss_mib()
    adam = [t for s in result.state.optimizer if s for p in s["state"].values() for t in p.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0]
    splits = [s for c in fed.clients for s in (c.train, c.val, c.test)]
    return {"clients": clients, "rss": rss,
            "lora_numel": sum(p.numel() for p in adapter_parameters(fed.model).values()),
            "adam_bytes": sum(t.numel() * t.element_size() for t in adam),
            "kept_states": sum(s is not None for s in result.state.optimizer),
            "tokens": sum(len(ids) for s in splits for ids in s.prompt_ids),
            "train_rows": sum(len(c.train) for c in fed.clients)}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(results: list[dict], command: str) -> str:
    from round_time import markdown_table

    header = ["clients", "RSS after import (MiB)", "after prepare (MiB)", "after 1 round (MiB)",
              "peak (MiB)", "AdamW state held (KiB)", "tokens held (all splits)"]
    rows = [[str(r["clients"]), *(f"{r['rss'][k]:.1f}" for k in ("import", "prepare", "round", "peak")),
             f"{r['adam_bytes'] / 1024:.1f}", f"{r['tokens']:,}"] for r in results]
    n = [r["clients"] for r in results]
    per_prepare = slope(n, [r["rss"]["prepare"] for r in results]) * 1024
    per_round = slope(n, [r["rss"]["round"] for r in results]) * 1024
    per_kept = slope(n, [r["rss"]["round"] - r["rss"]["prepare"] for r in results]) * 1024
    numel = results[0]["lora_numel"]
    adam_per_client = results[-1]["adam_bytes"] / results[-1]["kept_states"] / 1024
    lines = [
        f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d')}. Tiny model, LoRA r=8 on "
        f"q_proj/v_proj, synthetic table of {ROWS} rows x {FEATURES} numeric features (fixed, so the "
        f"total training rows — {results[0]['train_rows']:,} — are the same at every client count), "
        "IID, one FedIT round with every client, batch 8, 2 local steps, `train.optimizer_state=keep`, "
        "evaluation on at most 16 examples per client split. Each row is a fresh process.",
        markdown_table(header, rows),
        "Growth per client (least-squares slope over the rows above):\n\n" + markdown_table(
            ["quantity", "KiB per client"],
            [["RSS after prepare (partition, serializers, tokenized splits)", f"{per_prepare:.1f}"],
             ["RSS kept by the round (after round - after prepare)", f"{per_kept:.1f}"],
             ["RSS after one round (both of the above)", f"{per_round:.1f}"],
             ["AdamW state actually held (2 moments, fp32)", f"{adam_per_client:.1f}"],
             [f"computed: {numel:,} LoRA params x 4 B x (1 adapter + 2 moments)",
              f"{numel * 4 * 3 / 1024:.1f}"]]),
    ]
    return "\n\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="2,8,32,128")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.csv)))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        csv = write_table(Path(folder))
        for n in [int(v) for v in args.clients.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--csv", str(csv)],
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{n} clients: {results[-1]['rss']}", file=sys.stderr)
    command = f"python bench/memory.py --clients {args.clients}" + (" --write" if args.write else "")
    text = report(results, command)
    print(text)
    if args.write:
        from round_time import machine_info, write_section

        write_section("machine", "Machine", machine_info())
        write_section("memory", "Memory: RSS as the number of clients grows", text)


if __name__ == "__main__":
    main()
