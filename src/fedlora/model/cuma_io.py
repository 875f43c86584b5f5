"""CuMA's profiles and its exported format (model/cuma.py holds the layer itself).

Profiles. A profile is text, e.g. a row's demographic columns 'age_band: 25-35; sex: female', or
a client's description. z = mean over its tokens of the frozen base model's last hidden state
(adapters and CuMA off), the paper's frozen-encoder design with the base model as the encoder, so
nothing extra is downloaded. `ProfileEncoder` caches z per distinct text.

`PromptProfiles` gives each row of a batch its z from its token ids, for training loops that only
pass token ids to the model (fedlora's): it maps each example's prompt ids to its profile.

Export format (a folder; version 1):
    cuma_config.json        {"format": "fedlora-cuma", "version": 1, "base_model": str,
                             "lora": {r, alpha, dropout, target_modules}, "cuma": CumaConfig fields,
                             "profile_dim": d_z, "tensors": [names], "profiles": [texts] | absent}
    cuma_adapter.safetensors  every adapter tensor by fedlora's short name: '<m>.lora_A' (A, or A_0),
                             '<m>.lora_B' (B_0), '<m>.cuma_B' (B_1..B_N-1, shape [N-1, d_out, r]),
                             '<m>.cuma_A' (A_1..A_N-1, independent A only), '<parent>.cuma_router_<g>.
                             mlp.<i>.weight|bias', 'cuma_proj.weight|bias' (optional projection)
    cuma_profiles.safetensors  optional: {"z": [n, d_z]}, row i the profile texts[i] of the json
`load_cuma(base, folder)` rebuilds the same model for inference (tested: identical logits).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.config import LoraConfig
from fedlora.config.cuma import CumaConfig
from fedlora.model.cuma import attach_cuma, cuma_controller, cuma_paused
from fedlora.model.lora import adapter_state, load_adapter_state, wrap_lora

FORMAT, VERSION = "fedlora-cuma", 1


def profile_text(values: Mapping[str, object], columns: Sequence[str]) -> str:
    """'col: value; col: value' in the order of `columns` (the text the encoder reads)."""
    return "; ".join(f"{c}: {values[c]}" for c in columns)


class ProfileEncoder:
    """Frozen-base mean-pooled embeddings of profile texts, computed once per distinct text."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 128):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = sorted(set(texts) - set(self.cache))
        for i in range(0, len(new), self.batch_size):
            self._encode(new[i : i + self.batch_size])
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0)

    def _encode(self, texts: list[str]) -> None:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] or [0] for t in texts]
        width = max(len(i) for i in ids)
        pad = int(self.tokenizer.pad_token_id or 0)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):  # right padding: positions start at 0 for every row
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with cuma_paused(self.model), _adapters_off(self.model):
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             output_hidden_states=True, use_cache=False)
        self.model.train(was_training)
        hidden = out.hidden_states[-1].float()
        m = mask.to(device, torch.float32)[..., None]
        pooled = (hidden * m).sum(1) / m.sum(1)
        for text, z in zip(texts, pooled.cpu()):
            self.cache[text] = z


def _adapters_off(model):
    """PEFT's own switch: LoRA layers compute W0 x only (a no-op context for a plain model)."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    import contextlib
    return contextlib.nullcontext()


class PromptProfiles:
    """(input_ids, attention_mask) -> z per row, found by the row's prompt token ids.

    A scored or trained sequence is `prompt + verbalizer of a class` (train/batches.py) or the
    prompt alone; padding is dropped with the attention mask. Two rows with the same prompt must
    have the same profile (true when the profile columns are in the prompt); a conflict keeps the first.
    A prompt with no profile gets `default` when one is given (counted in `misses`), else a KeyError.
    """

    def __init__(self, verbalizer_ids: Sequence[Sequence[int]] = (), default: torch.Tensor | None = None):
        self.suffixes = sorted({tuple(v) for v in verbalizer_ids}, key=len, reverse=True)
        self.table: dict[tuple[int, ...], torch.Tensor] = {}
        self.default, self.misses = default, 0

    def add(self, prompt_ids: Sequence[Sequence[int]], z: torch.Tensor) -> None:
        for ids, row in zip(prompt_ids, z):
            self.table.setdefault(tuple(ids), row)

    def _find(self, ids: tuple[int, ...]) -> torch.Tensor:
        hit = self.table.get(ids)
        for suffix in self.suffixes:
            if hit is not None:
                break
            if len(ids) > len(suffix) and ids[-len(suffix):] == suffix:
                hit = self.table.get(ids[: -len(suffix)])
        if hit is None and self.default is not None:
            self.misses += 1
            return self.default
        if hit is None:
            raise KeyError("CuMA: a batch row's prompt has no profile; build PromptProfiles from every split the "
                           "model sees (train, val, test)")
        return hit

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        rows = []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
            rows.append(self._find(tuple(ids.tolist())))
        return torch.stack(rows).to(input_ids.device)


def save_cuma(model, folder: str | Path, lora: LoraConfig, base_model: str,
              profiles: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the attached CuMA adapter (and optional profile embeddings) in the format above."""
    ctl = cuma_controller(model)
    if ctl is None:
        raise ValueError("the model has no CuMA layer to export; attach_cuma() first")
    return write_cuma(folder, adapter_state(model), lora, ctl.cfg, ctl.profile_dim, base_model, profiles)


def write_cuma(folder: str | Path, state: Mapping[str, torch.Tensor], lora: LoraConfig, cuma: CumaConfig,
               profile_dim: int, base_model: str, profiles: Mapping[str, torch.Tensor] | None = None) -> Path:
    """The format above from an adapter state dict (a run's final adapter, the model long detached)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "cuma_adapter.safetensors"),
              metadata={"format": FORMAT})
    info = {"format": FORMAT, "version": VERSION, "base_model": base_model, "lora": dataclasses.asdict(lora),
            "cuma": dataclasses.asdict(cuma), "profile_dim": int(profile_dim), "tensors": sorted(state)}
    if profiles:
        texts = sorted(profiles)
        save_file({"z": torch.stack([profiles[t].float() for t in texts]).contiguous()},
                  str(folder / "cuma_profiles.safetensors"))
        info["profiles"] = texts
    (folder / "cuma_config.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load_cuma(base, folder: str | Path):
    """(model, profiles) from an exported folder: `base` (an unwrapped model of the recorded base)
    wrapped with LoRA and CuMA, every tensor loaded strictly; profiles {text: z} ({} when none)."""
    folder = Path(folder)
    info = json.loads((folder / "cuma_config.json").read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(f"{folder} is not a {FORMAT} v{VERSION} export (cuma_config.json says "
                         f"{info.get('format')!r} v{info.get('version')!r})")
    model = base if hasattr(base, "peft_config") else wrap_lora(base, LoraConfig(**info["lora"]))
    attach_cuma(model, CumaConfig(**info["cuma"]), profile_dim=info["profile_dim"])
    load_adapter_state(model, load_file(str(folder / "cuma_adapter.safetensors")))
    profiles = {}
    if info.get("profiles"):
        z = load_file(str(folder / "cuma_profiles.safetensors"))["z"]
        profiles = dict(zip(info["profiles"], z))
    return model, profiles
