"""Does FedTreeLoRA's tree recover the true client groups? The adjusted Rand index of each layer's
cut against each client's group, for every `fedtree*-seed*` run of a `fedlora compare` folder.

A client's true group: its task with several sources (data.clients), else the class it holds most
of in its training rows (for a task-family split such as generation_clusters, its dominant family).
The partition of each seed is rebuilt from the compare folder's config.yaml exactly as `compare`
builds it (one table, loaded with the config's seed; one partition per seed), so nothing beyond the
run's own files is needed.

    python bench/tree_groups.py runs/compare-20261204-200512          # a table per run
    python bench/tree_groups.py runs/compare-... --json out.json      # and the per-layer numbers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import adjusted_rand_score

from fedlora.config import RunConfig, from_dict
from fedlora.config.sources import client_tasks
from fedlora.data import load_table, make_partition


def true_groups(cfg: RunConfig, seed: int) -> list[str]:
    """Each client's group under `seed`: its task (several sources) or its majority class."""
    tasks = client_tasks(cfg)
    if tasks is not None:
        return tasks
    table = load_table(cfg.data, seed=cfg.seed)  # compare loads the table once, with the config's seed
    part = make_partition(table, cfg.partition, cfg.data, seed=seed)
    counts = [np.bincount(table.labels[c.train], minlength=len(table.classes)) for c in part.clients]
    return [table.classes[int(c.argmax())] for c in counts]


def score_run(run: Path, cfg: RunConfig, seed: int) -> dict:
    tree = json.loads((run / "client_tree.json").read_text())
    truth = true_groups(dataclasses.replace(cfg, seed=seed), seed)
    ari = [float(adjusted_rand_score(truth, labels)) for labels in tree["labels"]]
    return {"run": run.name, "seed": seed, "groups": truth, "clusters_per_layer": tree["counts"], "ari": ari,
            "exact_layers": sum(a == 1.0 for a in ari), "layers": len(ari), "mean_ari": float(np.mean(ari)),
            "min_ari": float(min(ari))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_dir", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cfg = from_dict(RunConfig, yaml.safe_load((args.compare_dir / "config.yaml").read_text()))
    results = []
    for run in sorted(args.compare_dir.glob("*-seed*")):
        match = re.fullmatch(r".*-seed(\d+)", run.name)
        if match and (run / "client_tree.json").exists():
            results.append(score_run(run, cfg, int(match.group(1))))
    if not results:
        raise SystemExit(f"{args.compare_dir}: no run with a client_tree.json (run fedtree in the compare)")
    print("| run | true groups | layers with ARI 1 | mean ARI | min ARI | clusters per layer |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {', '.join(r['groups'])} | {r['exact_layers']} of {r['layers']} | "
              f"{r['mean_ari']:.2f} | {r['min_ari']:.2f} | {min(r['clusters_per_layer'])}-{max(r['clusters_per_layer'])} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
