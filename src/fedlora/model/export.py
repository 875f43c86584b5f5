"""Final adapters that load anywhere: plain PEFT folders naming their real base, and merged models.

Why fedlora writes `adapter_config.json` and `adapter_model.safetensors` itself instead of calling
`PeftModel.save_pretrained` on the shared model: that model is rank r at every layer, and two
exports are not. A FedTreeLoRA client's mixed layer folds exactly into a rank-2r LoRA,

    s (lam B A + (1 - lam) B_e A_e) = s' [lam B, (1 - lam) B_e] [A; A_e],   s' = 2 alpha / 2r = s,

(PEFT's `rank_pattern` / `alpha_pattern` give those layers rank 2r and alpha 2 alpha), and FLoRA's
merged delta D (any rank up to K r per round) becomes a rank-k LoRA by truncated SVD. PEFT would
also record `model.config._name_or_path`: a cache path for the embedded model, None for tiny.

Every adapter folder also holds `fedlora.json` (how fedlora rebuilds the exact base, the form of
the adapter, the SVD error) and a model card (`model/card.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file, save_file

from fedlora.config import LoraConfig, ModelConfig
from fedlora.model.gguf import EMBEDDED
from fedlora.model.hub import BUILTIN, EMBEDDED_UPSTREAM as UPSTREAM  # shipped as a Q4_1 GGUF, de-quantized by fedlora
from fedlora.model.lora import _PREFIX

_BUILT_IN_CODE = ("tiny", "tiny-lm")


# --- which base ------------------------------------------------------------------------------


def base_model_id(name: str) -> str:
    """The id a user can load the base with: the Hugging Face id given, the embedded model's upstream
    id, an absolute local path, or 'fedlora:tiny' for a model built in code. Never a cache path."""
    name = name.strip()
    if name.lower() == EMBEDDED:
        return UPSTREAM
    if name.lower() in _BUILT_IN_CODE:
        return BUILTIN + name.lower()
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") or path.exists():
        return str(path.resolve())
    return name


def model_spec(name: str) -> str:
    """`model.name` as `load_model` needs it to rebuild the exact base later (local paths absolute)."""
    name = name.strip()
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# --- writing PEFT folders --------------------------------------------------------------------


def write_peft(folder: Path, factors: dict[str, torch.Tensor], lora: LoraConfig, base_id: str,
               r: int | None = None, alpha: float | None = None, rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None) -> Path:
    """`adapter_config.json` and `adapter_model.safetensors` for factors named '<module>.lora_A|B'."""
    folder.mkdir(parents=True, exist_ok=True)
    config = PeftLoraConfig(r=r or lora.r, lora_alpha=alpha if alpha is not None else lora.alpha,
                            lora_dropout=lora.dropout, target_modules=sorted({k.rsplit(".", 2)[-2] for k in factors}),
                            bias="none", task_type="CAUSAL_LM", inference_mode=True,
                            rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    config.base_model_name_or_path = base_id
    config.save_pretrained(str(folder))
    tensors = {f"{_PREFIX}{k}.weight": v.detach().to("cpu", torch.float32).contiguous() for k, v in factors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _block_logit(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'model.layers.3.mix_logit' (the block's mixing theta)."""
    head, tail = module.split(".layers.", 1)
    return f"{head}.layers.{tail.split('.', 1)[0]}.mix_logit"


def fold_mixing(adapter: dict[str, torch.Tensor], lora: LoraConfig
                ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """Plain LoRA factors for an adapter with mixed layers (`model/mixing.py`), exactly.

    A mixed module becomes A' = [A; A_e], B' = [lam B, (1 - lam) B_e] at rank 2r with alpha 2 alpha,
    so B' A' scaled by 2 alpha / 2r is the mixture. Returns (factors, rank_pattern, alpha_pattern).
    """
    factors, ranks, alphas = {}, {}, {}
    for key in sorted(k for k in adapter if k.endswith(".lora_A")):
        module = key[: -len(".lora_A")]
        a, b = adapter[key], adapter[f"{module}.lora_B"]
        if f"{module}.mix_ext_A" in adapter:
            lam = torch.sigmoid(adapter[_block_logit(module)].to(torch.float64))
            a = torch.cat([a, adapter[f"{module}.mix_ext_A"]]).to(torch.float32)
            b = torch.cat([lam * b.to(torch.float64),
                           (1 - lam) * adapter[f"{module}.mix_ext_B"].to(torch.float64)], dim=1).to(torch.float32)
            ranks[module], alphas[module] = a.shape[0], lora.alpha * a.shape[0] / lora.r
        factors[key], factors[f"{module}.lora_B"] = a, b
    return factors, ranks, alphas


def svd_lora(delta: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """Rank-k factors with B A = the best rank-k approximation of each D (Eckart-Young), k = min(rank, dims).

    B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T (balanced). Returns (factors, k, relative Frobenius error
    ||D - B A|| / ||D|| per module, and under 'overall' over all modules together).
    """
    k = min([rank, *(min(d.shape) for d in delta.values())])
    factors, errors, lost, total = {}, {}, 0.0, 0.0
    for module, d in sorted(delta.items()):
        u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
        root = s[:k].sqrt()
        factors[f"{module}.lora_A"] = (root[:, None] * vh[:k]).to(torch.float32)
        factors[f"{module}.lora_B"] = (u[:, :k] * root).to(torch.float32)
        tail, norm = float((s[k:] ** 2).sum()), float((s ** 2).sum())
        errors[module] = math.sqrt(tail / norm) if norm > 0 else 0.0
        lost, total = lost + tail, total + norm
    errors["overall"] = math.sqrt(lost / total) if total > 0 else 0.0
    return factors, k, errors


def write_delta(folder: Path, delta: dict[str, torch.Tensor], scale: float, model_name: str) -> Path:
    """The exact merged update (alpha / r) D as `base_delta.safetensors`: add it to each base weight."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "base_delta.safetensors"
    save_file({f"{k}.weight": (scale * v).contiguous() for k, v in delta.items()}, str(path),
              metadata={"base_model": model_name, "meaning": "add to each layer's base weight"})
    return path


def write_info(folder: Path, info: dict) -> Path:
    path = folder / "fedlora.json"
    path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return path


# --- a run's final adapters ---------------------------------------------------------------------


def save_adapters(fed, method, state, folder: Path, summary: dict | None = None,
                  data: dict | None = None) -> list[Path]:
    """The final adapters, each a PEFT folder with fedlora.json and a card: `global/`, or `client_<i>/`.

    `data`: the card's data description when `fed` holds no data (a Flower server; `card_info`).

    FLoRA (a method with a base delta): `global/` holds the exact delta (base_delta.safetensors)
    and its SVD LoRA at rank `export_rank` (method option; default lora.r). A mixing method's
    client folder holds the folded mixture, and its raw tensors in fedlora_state.safetensors.
    """
    from fedlora.model.card import adapter_card, card_info

    cfg, base_id = fed.cfg, base_model_id(fed.cfg.model.name)
    common = {"base_model": base_id, "fedlora_model": model_spec(cfg.model.name), **card_info(fed, method, summary, data)}
    written: list[tuple[Path, dict]] = []
    delta = method.base_delta(state.server)
    global_adapter = None if delta is not None else method.global_adapter(state.server)
    if getattr(method, "model_layer", None) == "cuma":
        written = _cuma_folders(fed, method, state, folder, global_adapter, base_id)
    elif delta is not None:
        out = folder / "global"
        write_delta(out, delta, cfg.lora.alpha / cfg.lora.r, cfg.model.name)
        factors, k, errors = svd_lora(delta, int(method.options.get("export_rank") or cfg.lora.r))
        write_peft(out, factors, cfg.lora, base_id, r=k, alpha=cfg.lora.alpha * k / cfg.lora.r)
        written.append((out, {"adapter": "global", "form": "svd", "rank": k, "relative_error": errors.pop("overall"),
                              "module_errors": errors}))
    elif global_adapter is not None and not method.personalized:
        factors = {k: v for k, v in global_adapter.items() if k.endswith(("lora_A", "lora_B"))}
        written.append((write_peft(folder / "global", factors, cfg.lora, base_id), {"adapter": "global", "form": "lora"}))
    else:
        for cid, client_state in enumerate(state.clients):
            adapter = method.personal_adapter(state.server, client_state)
            factors, ranks, alphas = fold_mixing(adapter, cfg.lora)
            out = write_peft(folder / f"client_{cid}", factors, cfg.lora, base_id, rank_pattern=ranks,
                             alpha_pattern=alphas)
            if len(factors) < len(adapter):
                save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                          str(out / "fedlora_state.safetensors"))
            written.append((out, {"adapter": f"client_{cid}", "form": "folded" if ranks else "lora",
                                  "mixed_modules": sorted(ranks)}))
    for out, extra in written:
        info = {**common, **extra}
        write_info(out, info)
        (out / "README.md").write_text(adapter_card(info), encoding="utf-8")
    return [out for out, _ in written]


def _cuma_folders(fed, method, state, folder: Path, global_adapter, base_id: str) -> list[tuple[Path, dict]]:
    """CuMA's experts and routers in its own format (model/cuma_io.py), never a PEFT folder: PEFT holds
    one LoRA per module, and expert 0 alone is not the trained mixture."""
    from fedlora.model.cuma_io import write_cuma

    cfg = fed.cfg
    d_z = fed.model.get_base_model().config.hidden_size  # the built-in profile encoder's width
    if global_adapter is not None and not method.personalized:
        adapters = {"global": global_adapter}
    else:
        adapters = {f"client_{cid}": method.personal_adapter(state.server, c) for cid, c in enumerate(state.clients)}
    extra = {"form": "cuma", "cuma": {"experts": cfg.cuma.experts, "top_k": cfg.cuma.top_k,
                                      "routing": cfg.cuma.routing, "use_profile": cfg.cuma.use_profile}}
    return [(write_cuma(folder / name, adapter, cfg.lora, cfg.cuma, d_z, base_id), {"adapter": name, **extra})
            for name, adapter in adapters.items()]


# --- merged models ----------------------------------------------------------------------------


def adapter_folder(run_dir: str | Path, adapter: str = "global") -> Path:
    """`RUN_DIR/adapters/<adapter>`; a clear error listing what exists when it does not."""
    run_dir = Path(run_dir)
    folder = run_dir / "adapters" / adapter
    if (folder / "fedlora.json").is_file():
        return folder
    here = sorted(p.name for p in (run_dir / "adapters").iterdir()) if (run_dir / "adapters").is_dir() else []
    runs = sorted(str(p.parents[2]) for p in run_dir.glob("*/adapters/*/fedlora.json"))  # compare: one per run
    hint = (f"it has {', '.join(here)}" if here else
            f"it holds several runs; pass one of {', '.join(dict.fromkeys(runs))}" if runs else
            "it has no adapters written by this fedlora version")
    raise ValueError(f"{run_dir} has no adapter {adapter!r} ({hint})")


def merged_model(folder: Path, device: str = "cpu"):
    """The exact base fedlora trained on, with the adapter in `folder` merged in, and its tokenizer.

    FLoRA's global folder merges its exact `base_delta.safetensors`, not the SVD adapter beside it.
    """
    from peft import PeftModel

    from fedlora.model.load import load_model

    info = json.loads((folder / "fedlora.json").read_text(encoding="utf-8"))
    if info.get("form") == "cuma":
        raise ValueError(f"{folder} is a CuMA mixture: its routing depends on each input, so it has no merged "
                         "form; load it with fedlora.model.cuma_io.load_cuma (docs/cuma.md)")
    model, tok = load_model(ModelConfig(name=info["fedlora_model"], device=device, dtype="float32"))
    if (folder / "base_delta.safetensors").is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, d in load_file(str(folder / "base_delta.safetensors")).items():
                params[name].add_(d.to(params[name].device, params[name].dtype))
        return model, tok
    return PeftModel.from_pretrained(model, str(folder), use_safetensors=True).merge_and_unload(), tok


def export_merged(run_dir: str | Path, out: str | Path, adapter: str = "global") -> Path:
    """`fedlora export RUN_DIR --merged OUT`: a model folder (safetensors, tokenizer, card) that plain
    `AutoModelForCausalLM.from_pretrained(OUT)` loads, computing what fedlora's base + adapter computes."""
    folder = adapter_folder(run_dir, adapter)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pass a new folder to --merged")
    model, tok = merged_model(folder)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    from fedlora.model.card import merged_card

    (out / "README.md").write_text(merged_card(folder), encoding="utf-8")
    return out
