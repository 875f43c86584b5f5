"""Engine overhead of two checkouts side by side: wall seconds of FedIT rounds on the tiny model.

The tiny model trains in milliseconds, so a round's time is mostly the engine's own work (swap,
payload encode/decode and validation, combine, bookkeeping): the place a runtime change would
show. Each measurement is a fresh process on one thread; the two checkouts alternate.

    python bench/runtime_overhead.py /path/to/old/checkout . --repeats 5 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_ONE = r"""
import sys, time
sys.path.insert(0, sys.argv[1] + "/tests"); sys.path.insert(0, sys.argv[1] + "/src")
import torch
torch.set_num_threads(1)
from conftest import make_config
from fedlora import prepare
from fedlora.fl.engine import Simulator
fed = prepare(make_config(f"fl.rounds={sys.argv[2]}", "fl.eval_every=0"))
Simulator(fed, "fedit").run()  # warm-up
t = time.perf_counter(); Simulator(fed, "fedit").run(); print(f"{time.perf_counter() - t:.4f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs=2, help="two source trees (each with src/ and tests/)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    times: dict[str, list[float]] = {c: [] for c in args.checkouts}
    for _ in range(args.repeats):
        for checkout in args.checkouts:
            out = subprocess.run([sys.executable, "-c", _ONE, checkout, str(args.rounds)], capture_output=True,
                                 text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            times[checkout].append(float(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(times[args.checkouts[0]])
    print(f"| checkout | median s ({args.rounds} rounds x 3 clients) | runs | ratio |")
    print("|---|---|---|---|")
    for checkout, xs in times.items():
        print(f"| {checkout} | {statistics.median(xs):.3f} | {', '.join(f'{x:.2f}' for x in xs)} | "
              f"{statistics.median(xs) / base:.2f} |")


if __name__ == "__main__":
    main()
