"""Accuracy against epsilon: FedIT with user-level DP-FedAvg at several noise multipliers.

Runs one method (default FedIT) without DP, with clipping only (z = 0) and with DP at each noise
multiplier in --noise, all on the same partition and seed, and reports the (epsilon, delta) spent,
global-test accuracy and AUROC, and the mean client-test accuracy. The base settings are a config
(default: the shipped `robustness_smollm2`, Breast Cancer on 10 IID clients, sized for 2 CPU cores)
with --model, --clients, --rounds and --set overrides on top; every client is sampled every round.

    OMP_NUM_THREADS=1 python bench/dp_tradeoff.py --model tiny --rounds 5 --write
    OMP_NUM_THREADS=1 python bench/dp_tradeoff.py --model smollm2-135m --rounds 3 --noise 0.3,1 --write

Clip norm: `--clip auto` clips at the median update norm of the non-private run (Andrew et al.
recommend the median; measured on the non-private run, so the choice of C itself is not private:
a tuning leak the table states). Adaptive clipping (`dp.adaptive`) would find it privately.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fedlora
from fedlora.config import DPConfig
from fedlora.fl.combine import flat_deltas
from fedlora.fl.engine import Simulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_time import markdown_table, write_section  # noqa: E402


def load(args):
    from fedlora.cli import _config_path

    return fedlora.load_config(_config_path(args.config), [
        f"model.name={args.model}", "model.num_threads=1", f"seed={args.seed}",
        f"partition.num_clients={args.clients}", "fl.client_fraction=1.0", f"fl.rounds={args.rounds}",
        "fl.eval_every=0", "eval.zero_shot=false", "eval.baseline=none", *args.set])


class _NormRecorder:
    """Wraps the server's combine chain in the non-private run, recording each client's update
    norm (to pick C; not private)."""

    def __init__(self, combine):
        self.combine, self.norms = combine, []

    def get(self, name):
        return self.combine.get(name)

    def __call__(self, state, updates, ctx):
        if updates:
            _, keys, deltas = flat_deltas(ctx.method, updates, ctx, "the norm recorder")
            self.norms.extend(float(torch.cat([d[k].reshape(-1) for k in keys]).norm()) for d in deltas)
        return self.combine(state, updates, ctx)


def one_run(fed, method: str, dp: DPConfig | None) -> dict:
    cfg = dataclasses.replace(fed.cfg, dp=dp or DPConfig())
    sim = Simulator(dataclasses.replace(fed, cfg=cfg), method)
    recorder = _NormRecorder(sim.server.combine)
    if dp is None:
        sim.server.combine = recorder
    started = time.perf_counter()
    result = sim.run()
    glob = result.final("global") or {}
    clients = [result.final(c) for c in range(len(fed.clients))]
    server = [r for r in result.rows if r["client"] == "server"][-1]
    return {"eps": server.get("epsilon"), "delta": server.get("delta"), "acc": glob.get("accuracy"),
            "auroc": glob.get("auroc"), "client_acc": statistics.mean(c["accuracy"] for c in clients if c),
            "wall": time.perf_counter() - started, "norms": recorder.norms}


def fmt(x, spec=".3f") -> str:
    if x is None:
        return "n/a"
    return "∞" if x == float("inf") else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="robustness_smollm2", help="YAML file or shipped config name")
    p.add_argument("--model", default="tiny")
    p.add_argument("--method", default="fedit")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--noise", default="0.1,0.3,1,3", help="noise multipliers z > 0, comma-separated")
    p.add_argument("--clip", default="auto", help="'auto' (median non-private update norm) or a number")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra config override a.b=value")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    cfg = load(args)
    fed = fedlora.prepare(cfg)
    plain = one_run(fed, args.method, None)
    clip = statistics.median(plain["norms"]) if args.clip == "auto" else float(args.clip)
    runs = [("no DP", "–", plain)]
    runs.append(("clip only", "0", one_run(fed, args.method, DPConfig(enabled=True, noise_multiplier=0.0, clip=clip))))
    for z in (float(v) for v in args.noise.split(",") if v.strip()):
        runs.append(("DP", f"{z:g}", one_run(fed, args.method, DPConfig(enabled=True, noise_multiplier=z, clip=clip))))
    total = time.perf_counter() - started
    argv = " ".join(sys.argv[1:])
    head = (f"Command: `OMP_NUM_THREADS=1 python bench/dp_tradeoff.py {argv}`  \n"
            f"Date: {time.strftime('%Y-%m-%d')}; wall time {total / 60:.1f} min; 1-minute load average "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (2 cores, shared). {args.method}, model "
            f"`{args.model}`, {cfg.data.source} ({len(cfg.data.columns or [])} columns), {args.clients} "
            f"{cfg.partition.scheme} clients, all sampled "
            f"every round (q = 1), {args.rounds} rounds of {cfg.train.local_steps} local step(s) (batch "
            f"{cfg.train.batch_size}, lr {cfg.train.lr:g}), config `{args.config}`, seed {args.seed}; scored after the "
            f"last round on at most {cfg.eval.max_examples} examples per split. "
            f"Clip C = {clip:.4g} ({'median of' if args.clip == 'auto' else 'given; compare with'} the non-private "
            f"run's {len(plain['norms'])} update norms, range {min(plain['norms']):.3g}-{max(plain['norms']):.3g}); "
            f"uniform weights and noise std z C / m on the mean (m = {args.clients}); epsilon from the RDP "
            f"accountant at delta = {fmt(runs[-1][2]['delta'], 'g')}.")
    header = ["run", "z", "epsilon", "global accuracy", "global AUROC", "mean client accuracy", "wall s"]
    rows = [[name, z, fmt(r["eps"], ".3g") if r["eps"] is not None else "–", fmt(r["acc"]), fmt(r["auroc"]),
             fmt(r["client_acc"]), f"{r['wall']:.1f}"] for name, z, r in runs]
    text = head + "\n\n" + markdown_table(header, rows)
    print(text)
    if args.write:
        write_section(f"dp_{args.model}", f"Differential privacy: accuracy against epsilon ({args.model})", text)


if __name__ == "__main__":
    main()
