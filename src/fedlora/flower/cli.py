"""`fedlora flower app|local`: the CLI's Flower commands, over `deploy.py`.

    fedlora flower app CONFIG --out DIR [--output-dir OUT]   # the folder for `flwr run DIR <superlink>`
    fedlora flower local CONFIG [--clients N] [--out DIR]    # SuperLink + N SuperNodes here, run, stop
    fedlora flower local CONFIG --secure                     # the same over TLS, nodes authenticated
"""

from __future__ import annotations

import time
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.jsonio import read_jsonl


def flower_command(args, cfg: RunConfig) -> Path:
    from fedlora.flower.deploy import LocalDeployment, write_app

    if args.action == "app":
        out = Path(args.out or "fedlora-flower-app")
        write_app(cfg, out, args.output_dir, args.round_timeout)
        print(f"Flower app written to {out}. On the coordinator: flwr run {out} <superlink-connection>")
        return out
    workdir = Path(args.out or Path(cfg.output_dir) / f"flower-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.clients is not None and args.clients != cfg.partition.num_clients:
        from dataclasses import replace

        cfg = replace(cfg, partition=replace(cfg.partition, num_clients=args.clients))
    started = time.perf_counter()
    with LocalDeployment(cfg, workdir, round_timeout=args.round_timeout, threads=args.threads,
                         secure=args.secure) as dep:
        print(f"SuperLink on 127.0.0.1:{dep.port}, {dep.num_nodes} SuperNodes; logs in {workdir / 'logs'}")
        if dep.secure:
            print(f"TLS: CA and server certificate in {dep.tls.ca_cert.parent}; SuperNode authentication on, "
                  f"{len(dep.registered)} keys registered (node ids {sorted(dep.registered.values())}) "
                  f"from {workdir / 'keys'}")
        out = dep.run_app(timeout=args.timeout)
    rows = read_jsonl(out / "metrics.jsonl")
    servers = [r for r in rows if r["client"] == "server"]
    print(f"{len(servers)} rounds in {time.perf_counter() - started:.1f} s; "
          f"bytes up {sum(r['bytes_up'] for r in servers)}, down {sum(r['bytes_down'] for r in servers)}; "
          f"processes exited with {dep.exit_codes}")
    from fedlora.report.html import write_report

    write_report(out)
    return out


def add_arguments(p) -> None:
    p.add_argument("action", choices=["app", "local"],
                   help="app: write the Flower app folder; local: SuperLink + SuperNodes on this machine, run, stop")
    p.add_argument("config", help="YAML file, or the name of a shipped config")
    p.add_argument("--out", default=None, help="app folder (app) or working folder (local)")
    p.add_argument("--output-dir", dest="output_dir", default=None,
                   help="(app) where the ServerApp writes metrics.jsonl and the global adapter, on its host")
    p.add_argument("--clients", type=int, default=None, help="(local) SuperNodes to start (partition.num_clients)")
    p.add_argument("--round-timeout", dest="round_timeout", type=float, default=600.0,
                   help="seconds the server waits for replies in a round before going on without them")
    p.add_argument("--timeout", type=float, default=3600.0, help="(local) seconds to wait for the whole run")
    p.add_argument("--threads", type=int, default=1, help="(local) torch threads per process")
    p.add_argument("--secure", action="store_true",
                   help="(local) TLS with a CA made for the run (OUT/certs) and SuperNode authentication "
                        "(a registered key per node, OUT/keys): the production set-up, on loopback")
