"""Merge `fedlora compare` (or `fedlora concordia`) runs made separately into one table.

Each run directory contributes its seeds. A directory written by a current `compare` holds
`rows.json` (every seed's raw rows, references included); an older one is rebuilt from its
`<method>-seed<k>/metrics.jsonl` files, and `--refs DIR` adds the zero-shot and baseline rows of
those seeds from a reference-only compare (`fedlora compare CONFIG --methods ""`, same seed).

    python bench/merge_compare.py /tmp/cmp-bc/bc /tmp/bench3/bc12 --refs /tmp/bench3/bc0ref \
        --out /tmp/bench3/bc-merged

The merged `comparison.json/.md/.png` are written with the same code `compare` uses, so the
table is exactly what one `compare --seeds 3` run would print for the same per-seed results.
With `--concordia`, `concordia.md` (stability, shifted split, synthetic quality) is written too,
as `fedlora concordia --seeds 3` would:

    python bench/merge_compare.py /tmp/cbench/s0/concordia-* /tmp/cbench/s1/concordia-* \
        /tmp/cbench/s2/concordia-* --concordia --out /tmp/cbench/merged
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fedlora.report.summary import write_comparison


def _rows_from_dirs(run_dir: Path) -> list[dict[str, list[dict]]]:
    """Per-seed {method: rows} from `<method>-seed<k>/metrics.jsonl` (runs without rows.json)."""
    per_seed: dict[int, dict[str, list[dict]]] = {}
    for sub in sorted(run_dir.iterdir()):
        match = re.fullmatch(r"(.+)-seed(\d+)", sub.name)
        if not match or not (sub / "metrics.jsonl").exists():
            continue
        lines = (sub / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        per_seed.setdefault(int(match[2]), {})[match[1]] = [json.loads(line) for line in lines if line.strip()]
    return [per_seed[s] for s in sorted(per_seed)]


def load_seeds(run_dir: Path, refs: Path | None) -> list[dict[str, list[dict]]]:
    if (run_dir / "rows.json").exists():
        return json.loads((run_dir / "rows.json").read_text(encoding="utf-8"))
    seeds = _rows_from_dirs(run_dir)
    if refs is not None:
        ref_seeds = json.loads((refs / "rows.json").read_text(encoding="utf-8"))
        if len(ref_seeds) != len(seeds):
            raise SystemExit(f"{refs} holds {len(ref_seeds)} seed(s) of references, {run_dir} holds {len(seeds)}")
        seeds = [{**ref, **rows} for ref, rows in zip(ref_seeds, seeds)]
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="compare run directories, in seed order")
    parser.add_argument("--refs", type=Path, help="reference-only compare for the runs without rows.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concordia", action="store_true", help="also write concordia.md (variant table)")
    args = parser.parse_args()
    per_seed = [s for run in args.runs for s in load_seeds(run, args.refs)]
    order = list(per_seed[-1])  # references first, then methods, as compare writes them
    per_seed = [{m: seed[m] for m in order} for seed in per_seed]
    args.out.mkdir(parents=True, exist_ok=True)
    write_comparison(per_seed, args.out)
    if args.concordia:  # imported here: fedlora.concordia pulls in torch and transformers
        from fedlora.concordia import variant_table

        (args.out / "concordia.md").write_text(variant_table(per_seed), encoding="utf-8")


if __name__ == "__main__":
    main()
