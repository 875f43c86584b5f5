"""fp32 against bf16 autocast on the demo config, side by side: round time split and final scores.

For each seed the demo federation (SmolLM2-135M, Breast Cancer, 4 Dirichlet clients, FedIT,
4 rounds of 5 local steps, `fedlora demo`'s data) is prepared once and run in each precision in
turn, on the same data and the same initial adapter; only `model.precision` differs. A round's
time is split into train, eval and overhead (everything else: swaps, payloads, aggregation,
bookkeeping). Then, once per precision, the physical reference: the simulator's training time for
one round against a plain PEFT loop written here without fedlora's training code (same model,
same clients' rows, same steps and batch size, same precision), so the simulator's own cost is
visible as ratio = plain / simulator (1.0: no cost).

    python bench/precision.py --seeds 3 --write          # about 21 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_time import machine_info, markdown_table, write_section  # noqa: E402

import fedlora  # noqa: E402
from fedlora.model.lora import adapter_parameters, adapter_state, load_adapter_state  # noqa: E402
from fedlora.model.precision import set_compute_precision  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def run_once(fed, precision: str, start: dict) -> dict:
    """One FedIT run in `precision`: per-round train / eval / overhead seconds and the final scores."""
    set_compute_precision(fed.model, precision)
    load_adapter_state(fed.model, start)
    stamps = [time.perf_counter()]
    result = fedlora.Simulator(fed, "fedit", on_round=lambda r, rows: stamps.append(time.perf_counter())).run()
    server = [r for r in result.rows if r["client"] == "server"]
    rounds = []
    for row, a, b in zip(server, stamps, stamps[1:]):
        train, evaluation = row.get("time_train", 0.0), row.get("time_eval", 0.0)
        rounds.append({"train": train, "eval": evaluation, "overhead": (b - a) - train - evaluation, "wall": b - a})
    final = [r for r in result.rows if r["client"] == "global" and r.get("round") == max(x["round"] for x in server)]
    return {"rounds": rounds, "auroc": final[-1]["auroc"], "accuracy": final[-1]["accuracy"]}


def plain_peft_round(fed, precision: str, steps: int, batch_size: int, lr: float, seed: int,
                     attention: str = "sdpa") -> float:
    """Seconds for `steps` AdamW steps on each client's rows: a hand-written PEFT loop (left-padded
    batch, logits of the answer positions only, cross entropy, backward, clip, step), with the
    model's attention implementation set to `attention` for the loop."""
    model = fed.model
    config = model.get_base_model().config
    config._attn_implementation = attention
    params = [p for p in adapter_parameters(model).values()]
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    rng = np.random.default_rng(seed)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    model.train()
    started = time.perf_counter()
    for client in fed.clients:
        data = client.train
        optimizer = torch.optim.AdamW(params, lr=lr)
        for _ in range(steps):
            rows = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
            seqs = [data.prompt_ids[i] + data.verbalizer_ids[data.labels[i]] for i in rows]
            answer = max(len(data.verbalizer_ids[data.labels[i]]) for i in rows)
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), fed.pad_id)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.full((len(seqs), answer), -100)
            for k, (i, seq) in enumerate(zip(rows, seqs)):
                ids[k, width - len(seq):], mask[k, width - len(seq):] = torch.tensor(seq), 1
                target = data.verbalizer_ids[data.labels[i]]
                labels[k, answer - len(target):] = torch.tensor(target)
            position = (mask.cumsum(1) - 1).clamp(min=0)
            with autocast:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position.to(device),
                               logits_to_keep=answer + 1, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    model.eval()
    config._attn_implementation = "sdpa"
    return time.perf_counter() - started


def summary_rows(runs: dict[str, list[dict]]) -> list[list[str]]:
    """One row per precision: medians over seeds of per-round medians (rounds >= 2), and scores."""
    rows, base = [], None
    for precision, seeds in runs.items():
        med = {k: statistics.median(statistics.median(r[k] for r in s["rounds"][1:] or s["rounds"]) for s in seeds)
               for k in ("train", "eval", "overhead", "wall")}
        base = base or med["wall"]
        au = [s["auroc"] for s in seeds]
        acc = [s["accuracy"] for s in seeds]
        rows.append([precision, f"{med['train']:.1f}", f"{med['eval']:.1f}", f"{med['overhead']:.2f}",
                     f"{med['wall']:.1f}", f"{base / med['wall']:.2f}x",
                     f"{np.mean(au):.3f} ± {np.std(au):.3f} ({', '.join(f'{x:.3f}' for x in au)})",
                     f"{np.mean(acc):.3f} ± {np.std(acc):.3f}"])
    return rows


def per_seed_speedups(runs: dict[str, list[dict]]) -> str:
    """bf16's speed-up of a round within each seed (medians over rounds >= 2): the ratio that
    survives the host's speed drifting between seeds, as it does on a shared VM."""
    def wall(s: dict) -> float:
        return statistics.median(r["wall"] for r in s["rounds"][1:] or s["rounds"])

    def part(s: dict, key: str) -> float:
        return statistics.median(r[key] for r in s["rounds"][1:] or s["rounds"])

    rows = []
    for seed, (a, b) in enumerate(zip(runs["fp32"], runs["bf16"])):
        rows.append(f"seed {seed}: round {wall(a) / wall(b):.2f}x (train {part(a, 'train') / part(b, 'train'):.2f}x, "
                    f"eval {part(a, 'eval') / part(b, 'eval'):.2f}x)")
    ratios = sorted(wall(a) / wall(b) for a, b in zip(runs["fp32"], runs["bf16"]))
    return f"bf16 speed-up within each seed: {'; '.join(rows)}; median {statistics.median(ratios):.2f}x."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m", help="model.name ('tiny' for a quick check of the script)")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--section", default="precision", help="the docs/benchmarks.md section --write replaces")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    reference = []
    for seed in range(args.seeds):
        cfg = fedlora.load_config("demo", [f"seed={seed}", f"fl.rounds={args.rounds}", "eval.baseline=none",
                                           f"model.name={args.model}"])
        fed = fedlora.prepare(cfg)
        start = adapter_state(fed.model)
        for precision in PRECISIONS:
            runs[precision].append(run_once(fed, precision, start))
            print(precision, seed, runs[precision][-1], flush=True)
        if seed == 0:
            for precision in PRECISIONS:
                load_adapter_state(fed.model, start)
                set_compute_precision(fed.model, precision)
                sim = statistics.median(r["train"] for r in runs[precision][0]["rounds"][1:])
                row = [precision, f"{sim:.1f}"]
                # SDPA: what a hand-written loop gets by default; the simulator's choice: eager
                # attention for short bf16 training batches on a CPU (model/precision.py)
                same = "eager" if precision == "bf16" and fed.model.device.type == "cpu" else "sdpa"
                for attention in ("sdpa", same):
                    load_adapter_state(fed.model, start)
                    plain = plain_peft_round(fed, precision, cfg.train.local_steps, cfg.train.batch_size,
                                             cfg.train.lr, seed, attention)
                    row += [f"{plain:.1f}", f"{plain / sim:.2f}"]
                reference.append(row)
                print("reference", reference[-1], flush=True)
    command = (f"python bench/precision.py --seeds {args.seeds} --rounds {args.rounds}"
               + (" --write" if args.write else "") + (f" --section {args.section}" if args.section != "precision" else ""))
    text = (f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d')}; 1-minute load average {load_before:.2f} "
            f"before, {os.getloadavg()[0]:.2f} after (2 cores; this run adds about 1). The demo config (SmolLM2-135M, "
            f"Breast Cancer, 4 Dirichlet(0.5) clients, FedIT, {args.rounds} rounds x 5 local steps of batch 8, "
            "evaluation every round on at most 40 examples per split); per seed one prepare(), then each precision "
            "from the same initial adapter. Seconds per round: median over seeds of the median over rounds >= 2; "
            "overhead = wall - train - eval. Final global-test scores: mean ± std over seeds (values).\n\n"
            + markdown_table(["precision", "train s", "eval s", "overhead s", "round s", "speed-up",
                              "global AUROC", "global accuracy"], summary_rows(runs))
            + "\n\n" + per_seed_speedups(runs)
            + "\n\nPhysical reference (seed 0): the simulator's train phase of a round against a plain PEFT loop "
              "doing the same steps (4 clients x 5 steps of batch 8) in the same precision, once with SDPA "
              "attention (a hand-written loop's default) and once with the attention the simulator uses (eager "
              "for short bf16 training batches on a CPU, model/precision.py); ratio = plain / simulator.\n\n"
            + markdown_table(["precision", "simulator train s", "plain loop, SDPA s", "ratio",
                              "plain loop, same attention s", "ratio"], reference))
    print(text)
    if args.write:
        write_section("machine", "Machine", machine_info())
        write_section(args.section, "Mixed precision: fp32 against bf16 autocast (demo config)", text)


if __name__ == "__main__":
    main()
