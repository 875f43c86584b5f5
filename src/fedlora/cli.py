"""Command line: a thin layer over fedlora's Python API.

    fedlora demo                         # embedded SmolLM2-135M, FedIT vs local-only vs zero-shot vs baseline
    fedlora run CONFIG [--set a.b=v ...] # one method
    fedlora resume RUN_DIR               # continue a killed run from its newest good checkpoint
    fedlora report RUN_DIR               # rebuild RUN_DIR/report.html
    fedlora export RUN_DIR --merged OUT [--adapter client_0]   # base + adapter as one model folder
    fedlora compare CONFIG --methods fedit,local --seeds 2
    fedlora robustness CONFIG [--attacks sign_flip,ipm] [--aggregators "mean;nnm+trimmed_mean"] [--f 0,1,2]
    fedlora concordia CONFIG --variants real,concordia,static,decoupled   # synthetic tables (docs/concordia.md)
    fedlora flower local CONFIG --clients 3  # on Flower: SuperLink + SuperNodes here (docs/flower.md)
    fedlora run CONFIG --data my.csv --target outcome   # your own table (all its columns)
    fedlora config show CONFIG [--set a.b=v ...]          # the resolved config as YAML
    fedlora datasets | fedlora models | fedlora methods | fedlora --version
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fedlora.config.errors import ConfigError
from fedlora.config.loading import config_path, shipped_configs  # noqa: F401  (shipped_configs: public here, as before)

DEMO_METHODS = ["fedit", "local"]
_ALIASES = {"fedavg": "fedit", "fedlora": "fedit"}


def _config_path(name: str) -> Path:
    try:
        return config_path(name)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def _overrides(args, config: Path) -> list[str]:
    """`--data`/`--target` as overrides, before the `--set` ones (which win).

    A new `--data` file also resets `data.columns` to all columns and `data.target` to none (the
    built-in's own, or "pass --target") unless `--target` names it: the config's column list and
    target belong to the config's own table.
    """
    from fedlora.config import load_config

    sets = list(getattr(args, "overrides", []))
    data, target = getattr(args, "data", None), getattr(args, "target", None)
    out = []
    if data is not None and load_config(config, sets).data.source != data:
        out += ["data.columns=null", "data.target=null"]
    if data is not None:
        out.append(f"data.source={json.dumps(data)}")
    if target is not None:
        out.append(f"data.target={json.dumps(target)}")
    log_to = getattr(args, "log_to", None)
    if log_to is not None:  # --log-to tensorboard,mlflow: report.log_to (report/trackers.py)
        out.append(f"report.log_to={json.dumps(_split(log_to))}")
    return out + sets


def _check_methods(names: list[str]) -> None:
    """Unknown method names, with close matches, before anything is loaded."""
    from fedlora.fl.methods import available_methods

    known = available_methods()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            if name.lower() in _ALIASES:  # FedIT is FedAvg of the LoRA matrices
                close = [_ALIASES[name.lower()]] + [c for c in close if c != _ALIASES[name.lower()]]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown method {name!r}{hint} (available: {', '.join(known)}; see `fedlora methods`)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning of LLMs.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    parser.add_argument("--version", action="version", version=f"fedlora {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_overrides(p):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set fl.rounds=3 (repeatable)")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
        return p

    def with_data(p):
        p.add_argument("--data", default=None, metavar="PATH",
                       help="data.source: a .csv/.parquet/.jsonl file or a built-in name; resets data.columns")
        p.add_argument("--target", default=None, metavar="NAME", help="data.target: the column to predict")
        p.add_argument("--log-to", dest="log_to", default=None, metavar="TRACKERS",
                       help="report.log_to: experiment trackers fed every round, comma-separated: tensorboard, "
                            'mlflow (pip install "fedlora[trackers]")')
        return with_overrides(p)

    p = with_data(sub.add_parser("run", help="run one method from a YAML config"))
    p.add_argument("config", help="YAML file, or the name of a shipped config (e.g. demo)")
    p = with_data(sub.add_parser("compare", help="run several methods on identical partitions"))
    p.add_argument("config")
    p.add_argument("--methods", default="fedit,local", help="comma-separated method names")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    p = with_data(sub.add_parser("robustness", help="Byzantine sweep: attacks x aggregators x f x momentum"))
    p.add_argument("config", help="YAML file, or a shipped config (e.g. robustness_tiny)")
    p.add_argument("--attacks", default="sign_flip,ipm,alie,gaussian", help="comma-separated attack names")
    p.add_argument("--attack-args", dest="attack_args", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="an attack option, e.g. sign_flip.scale=100 (repeatable)")
    p.add_argument("--aggregators", default="mean;median;trimmed_mean;krum;nnm+trimmed_mean",
                   help="';'-separated chains, '+' joins a chain's steps (nnm+trimmed_mean)")
    p.add_argument("--f", default="0,1,2,3", help="comma-separated numbers of Byzantine clients")
    p.add_argument("--momentum", default="none,0.9", help="comma-separated worker-momentum betas ('none': off)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p = with_data(sub.add_parser("concordia", help="Concordia and its baselines on identical partitions"))
    p.add_argument("config", help="YAML file, or a shipped config (e.g. concordia_smollm2)")
    p.add_argument("--variants", default="real,concordia,static,decoupled,uniform,local",
                   help="comma-separated: real (Concordia off) and concordia.variant values")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    p = sub.add_parser("export", help="write base + adapter as one model folder that transformers loads")
    p.add_argument("run_dir", help="the run directory (holding adapters/)")
    p.add_argument("--merged", required=True, metavar="OUT", help="the new model folder to write")
    p.add_argument("--adapter", default="global", help="global (default) or client_<i> for a personal adapter")
    p = sub.add_parser("report", help="rebuild RUN_DIR/report.html from the files a run wrote")
    p.add_argument("run_dir", help="a run directory (run, compare, robustness, concordia or flower local)")
    p = sub.add_parser("resume", help="continue a killed `run` from its newest good checkpoint")
    p.add_argument("run_dir", help="the run directory (holding config.yaml and checkpoints/)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    p = with_data(sub.add_parser("demo", help="the main job on embedded defaults (SmolLM2-135M, offline)"))
    p.add_argument("--methods", default=",".join(DEMO_METHODS))
    p = with_overrides(sub.add_parser("flower", help="run on Flower (SuperLink + SuperNodes): see docs/flower.md"))
    from fedlora.flower.cli import add_arguments as add_flower_arguments

    add_flower_arguments(p)
    p = with_overrides(sub.add_parser("config", help="print a resolved config: fedlora config show CONFIG [--set ...]"))
    p.add_argument("action", choices=["show"])
    p.add_argument("config", help="YAML file, or the name of a shipped config (e.g. tiny)")
    sub.add_parser("datasets", help="list built-in datasets")
    sub.add_parser("models", help="list the models fedlora can load offline")
    sub.add_parser("methods", help="list registered federated methods")
    return parser


def _version() -> str:
    try:
        return version("fedlora")
    except PackageNotFoundError:  # a source tree that was never installed
        from fedlora import __version__

        return __version__


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _print_rows(rows: list[dict], title: str) -> None:
    """Columns by key and names never cut (report/listing.py)."""
    from fedlora.report.listing import print_rows

    print_rows(rows, title)


def _split(text: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _robustness_args(args, seed: int) -> dict:
    import yaml

    attack_args: dict[str, dict] = {}
    for item in args.attack_args:
        key, sep, value = item.partition("=")
        attack, dot, option = key.strip().partition(".")
        if not sep or not dot or not option:
            raise ValueError(f"--attack-args expects ATTACK.KEY=VALUE, got {item!r}")
        attack_args.setdefault(attack, {})[option] = yaml.safe_load(value)
    try:
        fs = [int(f) for f in _split(args.f)]
        momentum = [None if m.lower() in ("none", "null", "off") else float(m) for m in _split(args.momentum)]
    except ValueError as exc:
        raise ValueError(f"--f takes integers and --momentum numbers or 'none': {exc}") from None
    return {"attacks": _split(args.attacks), "aggregators": _split(args.aggregators, ";"), "fs": fs,
            "momentum": momentum, "seeds": [seed + k for k in range(args.seeds)], "attack_args": attack_args}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.quiet)
    from fedlora.config import ConfigError, load_config
    from fedlora.data import DataError
    from fedlora.fl.preflight import preflight
    from fedlora.model import ModelError

    try:
        if args.command == "datasets":
            from fedlora.data import list_builtins

            _print_rows(list_builtins(), "built-in datasets (or pass any CSV/Parquet/JSONL path)")
        elif args.command == "models":
            from fedlora.model import list_models

            _print_rows(list_models(), "models (or pass any Hugging Face id, local directory or .gguf file)")
        elif args.command == "methods":
            from fedlora.fl.methods import available_methods, method_class

            _print_rows([{"name": m, "paper": method_class(m).paper or "-",
                          "personalized": method_class(m).personalized,
                          "decentralized": method_class(m).decentralized} for m in available_methods()],
                        "federated methods")
        elif args.command == "flower":
            from fedlora.flower.cli import flower_command

            cfg = load_config(_config_path(args.config), args.overrides)
            preflight(cfg)  # before any process or file is started
            print(f"results: {flower_command(args, cfg)}")
        elif args.command == "config":
            import yaml

            cfg = load_config(_config_path(args.config), args.overrides)
            preflight(cfg, model=False)  # printing a config needs no model, so none is looked up
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        elif args.command == "export":
            from fedlora.model.export import export_merged

            print(f"merged model: {export_merged(args.run_dir, args.merged, args.adapter)}")
        elif args.command == "report":
            from fedlora.report.html import write_report

            print(f"report: {write_report(args.run_dir)}")
        elif args.command == "resume":
            from fedlora.experiment import resume

            print(f"results: {resume(args.run_dir, quiet=args.quiet)}")
        else:
            from fedlora.experiment import compare, run

            config = _config_path("demo" if args.command == "demo" else args.config)
            cfg = load_config(config, _overrides(args, config))
            if args.command in ("run", "compare", "demo"):
                _check_methods([cfg.fl.method] if args.command == "run" else _split(args.methods))
            preflight(cfg)
            if args.command == "run":
                out = run(cfg, quiet=args.quiet)
            elif args.command == "robustness":
                from fedlora.robustness import robustness_sweep

                out = robustness_sweep(cfg, **_robustness_args(args, cfg.seed), quiet=args.quiet)
            elif args.command == "concordia":
                from fedlora.concordia import compare_variants

                out = compare_variants(cfg, _split(args.variants), [cfg.seed + k for k in range(args.seeds)],
                                       quiet=args.quiet)
            else:
                methods = [m.strip() for m in args.methods.split(",") if m.strip()]
                seeds = [cfg.seed + k for k in range(getattr(args, "seeds", 1))]
                out = compare(cfg, methods, seeds=seeds, quiet=args.quiet)
            print(f"results: {out}")
    except (ConfigError, DataError, ModelError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
