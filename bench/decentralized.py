"""The decentralized benchmark: methods x graphs x seeds, one `fedlora compare` per graph, then one table.

    python bench/decentralized.py --config decentralized_smollm2 --seeds 3 \
        --methods dec_lora,dec_ffa,dec_rolora,tad_lora \
        --graphs er:0.5,er:0.2,er:0.1,er:0.05,er:0.02,ring --out runs/decentralized
    python bench/decentralized.py --table runs/decentralized      # the table only, from finished runs

Each graph's compare writes `<out>/<graph>/` (comparison.json, per-run metrics); the table puts the
mean ± std over clients and seeds of every client's own adapter on the global test (TAD-LoRA's
metric) in one row per method and one column per graph, with the mixing rate rho of each graph
and the final consensus distance of the products B A. Extra `--set KEY=VALUE` go to every compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlora import compare, load_config
from fedlora.cli import _config_path


def _graph_overrides(spec: str) -> tuple[str, list[str]]:
    """'er:0.1' -> ('er-0.1', [graph=erdos_renyi, p=0.1]); 'ring', 'pairwise:0.1', 'kregular:4', ..."""
    name, _, value = spec.partition(":")
    graph = {"er": "erdos_renyi"}.get(name, name)
    sets = [f"topology.graph={graph}"]
    key = {"erdos_renyi": "p", "pairwise": "q", "kregular": "k"}.get(graph)
    if value and key:
        sets.append(f"topology.{key}={value}")
    return spec.replace(":", "-"), sets


def run_grid(config: str, methods: list[str], graphs: list[str], seeds: int, out: Path, extra: list[str]) -> None:
    for spec in graphs:
        label, sets = _graph_overrides(spec)
        cfg = load_config(_config_path(config), [*extra, *sets, f"output_dir={out}", f"run_name={label}"])
        compare(cfg, methods, seeds=[cfg.seed + k for k in range(seeds)], quiet=True)


def _final(path: Path, key: str):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    network = [r for r in rows if r["client"] == "server"]
    return network[-1].get(key) if network else None


def table(out: Path) -> str:
    graphs = sorted(p for p in out.iterdir() if (p / "comparison.json").is_file())
    cells: dict[str, dict[str, str]] = {}
    rho, consensus = {}, {}
    for g in graphs:
        for row in json.loads((g / "comparison.json").read_text()):
            stats = (row["global"] or {}).get("accuracy")
            if stats and stats["count"]:
                cells.setdefault(row["method"], {})[g.name] = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
        runs = sorted(g.glob("*-seed*/metrics.jsonl"))
        if runs:
            rho[g.name] = _final(runs[0], "rho")
        for run in runs:
            method = run.parent.name.rsplit("-seed", 1)[0]
            consensus.setdefault(method, {}).setdefault(g.name, []).append(_final(run, "consensus_product"))
    names = [g.name for g in graphs]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| rho | " + " | ".join(f"{rho[n]:.3f}" if rho.get(n) is not None else "-" for n in names) + " |")
    for method, by_graph in cells.items():
        lines.append(f"| {method} | " + " | ".join(by_graph.get(n, "-") for n in names) + " |")
    lines += ["", "Final consensus distance of B A (mean over seeds):", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, by_graph in consensus.items():
        vals = [by_graph.get(n) for n in names]
        lines.append(f"| {method} | " + " | ".join(
            f"{sum(v) / len(v):.2e}" if v and None not in v else "-" for v in vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="decentralized_smollm2")
    ap.add_argument("--methods", default="dec_lora,dec_ffa,dec_rolora,tad_lora")
    ap.add_argument("--graphs", default="er:0.5,er:0.2,er:0.1,er:0.05,er:0.02,ring")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/decentralized")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--table", metavar="OUT", help="only print the table of finished runs under OUT")
    args = ap.parse_args()
    if args.table is None:
        out = Path(args.out)
        run_grid(args.config, args.methods.split(","), args.graphs.split(","), args.seeds, out, args.extra)
    print(table(Path(args.table or args.out)))


if __name__ == "__main__":
    main()
