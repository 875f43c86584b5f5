"""`fedlora flower app|local|simulate`: the CLI's Flower commands, over `deploy.py`.

    fedlora flower app CONFIG --out DIR [--output-dir OUT]   # the folder for `flwr run DIR <superlink>`
    fedlora flower local CONFIG [--clients N] [--out DIR]    # SuperLink + N SuperNodes here, run, stop
    fedlora flower local CONFIG --secure                     # the same over TLS, nodes authenticated
    fedlora flower local CONFIG --out DIR --resume           # continue DIR's run from its last checkpoint
    fedlora flower simulate CONFIG [--clients N]             # Flower's simulation engine (Ray), here
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.config.sources import federation_size
from fedlora.jsonio import read_jsonl


def flower_command(args, cfg: RunConfig) -> Path:
    from fedlora.flower.deploy import write_app

    if args.action == "app":
        out = Path(args.out or "fedlora-flower-app")
        write_app(cfg, out, args.output_dir, args.round_timeout)
        print(f"Flower app written to {out}. On the coordinator: flwr run {out} <superlink-connection>")
        return out
    if args.resume and (args.action != "local" or not args.out):
        raise ValueError("--resume continues a `fedlora flower local` run: give its working folder as --out")
    if args.secure and args.action == "simulate":
        raise ValueError("--secure is for `local` (real processes talking over TLS); a simulation has no transport")
    if args.resume and not (Path(args.out) / "output" / "checkpoints").is_dir():
        raise ValueError(f"--resume: {Path(args.out) / 'output'} holds no checkpoints of a run to continue")
    workdir = Path(args.out or Path(cfg.output_dir) / f"flower-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.clients is not None and args.clients != federation_size(cfg):
        if cfg.data.clients is not None:
            raise ValueError(f"--clients {args.clients}: this config's data.clients lists {federation_size(cfg)} "
                             "clients; change the entries' clients, not --clients")
        from dataclasses import replace

        cfg = replace(cfg, partition=replace(cfg.partition, num_clients=args.clients))
    started = time.perf_counter()
    simulation = args.action == "simulate"
    # SIGTERM (a scheduler, `kill`) leaves through the `with` below, so every process is stopped.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        out, exit_codes = _deploy(args, cfg, workdir, simulation)
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = read_jsonl(out / "metrics.jsonl")
    servers = [r for r in rows if r["client"] == "server"]
    print(f"{len(servers)} rounds in {time.perf_counter() - started:.1f} s; "
          f"bytes up {sum(r['bytes_up'] for r in servers)}, down {sum(r['bytes_down'] for r in servers)}; "
          f"processes exited with {exit_codes}")
    from fedlora.report.html import write_report

    write_report(out)
    return out


def _deploy(args, cfg: RunConfig, workdir: Path, simulation: bool) -> tuple[Path, dict]:
    """Start the processes, run, stop them all: the output folder and each process's exit code."""
    from fedlora.flower.deploy import LocalDeployment

    with LocalDeployment(cfg, workdir, round_timeout=args.round_timeout, threads=args.threads,
                         secure=args.secure, simulation=simulation, cpus_per_client=args.cpus_per_client) as dep:
        if simulation:
            print(f"SuperLink on 127.0.0.1:{dep.port} with Flower's simulation engine (Ray): "
                  f"{federation_size(cfg)} virtual SuperNodes, {args.cpus_per_client} CPU(s) per ClientApp "
                  f"actor; logs in {workdir / 'logs'}")
        else:
            print(f"SuperLink on 127.0.0.1:{dep.port}, {dep.num_nodes} SuperNodes; logs in {workdir / 'logs'}")
        if dep.secure:
            print(f"TLS: CA and server certificate in {dep.tls.ca_cert.parent}; SuperNode authentication on, "
                  f"{len(dep.registered)} keys registered (node ids {sorted(dep.registered.values())}) "
                  f"from {workdir / 'keys'}")
        out = dep.run_app(timeout=args.timeout, resume=args.resume)
    return out, dep.exit_codes


def add_arguments(p) -> None:
    p.add_argument("action", choices=["app", "local", "simulate"],
                   help="app: write the Flower app folder; local: SuperLink + SuperNodes on this machine, run, "
                        "stop; simulate: the same app on Flower's simulation engine (Ray; pip install "
                        "\"fedlora[simulation]\")")
    p.add_argument("config", help="YAML file, or the name of a shipped config")
    p.add_argument("--out", default=None, help="app folder (app) or working folder (local, simulate)")
    p.add_argument("--output-dir", dest="output_dir", default=None,
                   help="(app) where the ServerApp writes metrics.jsonl and the global adapter, on its host")
    p.add_argument("--clients", type=int, default=None,
                   help="(local, simulate) SuperNodes to start, or virtual ones (partition.num_clients)")
    p.add_argument("--cpus-per-client", dest="cpus_per_client", type=int, default=1,
                   help="(simulate) CPUs Ray gives each ClientApp actor: cores / this = actors at once")
    p.add_argument("--resume", action="store_true",
                   help="(local) continue the run in --out from its newest good checkpoint")
    p.add_argument("--round-timeout", dest="round_timeout", type=float, default=600.0,
                   help="seconds the server waits for replies in a round before going on without them")
    p.add_argument("--timeout", type=float, default=3600.0, help="(local, simulate) seconds to wait for the whole run")
    p.add_argument("--threads", type=int, default=1, help="(local, simulate) torch threads per process")
    p.add_argument("--secure", action="store_true",
                   help="(local) TLS with a CA made for the run (OUT/certs) and SuperNode authentication "
                        "(a registered key per node, OUT/keys): the production set-up, on loopback")
