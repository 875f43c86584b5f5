"""One FedIT round of a big model on one CUDA GPU, as FlowerTune users run them: 4-bit (QLoRA)
base weights, gradient checkpointing, bf16 autocast, optionally paged 8-bit AdamW. Prints peak GPU
memory, tokens/s of training and scoring, and the round's scores. Needs CUDA and bitsandbytes
(`pip install bitsandbytes`); it refuses to start without them and is never run in CI.

    python bench/gpu_check.py meta-llama/Llama-2-7b-hf                   # a few minutes on one GPU
    python bench/gpu_check.py Qwen/Qwen2.5-7B-Instruct --quantization 8bit --optimizer adamw

The model id must be loadable here (Hugging Face cache or hub access); the data is the demo's
Breast Cancer table, so nothing else is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fedlora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a Hugging Face id or local directory (7B-class)")
    ap.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    ap.add_argument("--optimizer", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw"])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU; this machine has none (use bench/precision.py on a CPU)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        sys.exit("bench/gpu_check.py needs bitsandbytes: pip install bitsandbytes")
    overrides = [f"model.name={args.model}", f"model.quantization={args.quantization}", "model.precision=bf16",
                 "model.gradient_checkpointing=true", f"train.optimizer={args.optimizer}",
                 f"partition.num_clients={args.clients}", f"train.local_steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"lora.target_modules=[{args.targets}]",
                 "fl.rounds=1", "eval.baseline=none", "eval.max_examples=32", "eval.batch_size=8"]
    cfg = fedlora.load_config("demo", overrides)
    started = time.perf_counter()
    fed = fedlora.prepare(cfg)
    load_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    result = fedlora.Simulator(fed, "fedit").run()
    server = [r for r in result.rows if r["client"] == "server"][-1]
    mean_len = sum(len(p) for c in fed.clients for p in c.train.prompt_ids) / sum(len(c.train) for c in fed.clients)
    train_tokens = args.clients * args.steps * args.batch_size * mean_len
    scored = sum(r.get("n", 0) for r in result.rows if r.get("split") in ("test", "global_test"))
    final = [r for r in result.rows if r["client"] == "global"]
    print(f"model {args.model}: load + prepare {load_s:.0f} s; {args.quantization}, {args.optimizer}, "
          f"gradient checkpointing, bf16 autocast")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
          f"(reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB) on {torch.cuda.get_device_name(0)}")
    print(f"train {server['time_train']:.1f} s: {train_tokens / server['time_train']:.0f} tokens/s; "
          f"eval {server['time_eval']:.1f} s: {scored * mean_len / server['time_eval']:.0f} prompt tokens/s")
    if final:
        print(f"global test after one round: accuracy {final[-1]['accuracy']:.3f}, AUROC {final[-1]['auroc']:.3f}")


if __name__ == "__main__":
    main()
