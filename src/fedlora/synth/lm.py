"""The language-model plumbing of the table generator and GRPO: adapter swaps, tokens, sampling, log-probs.

A client's generator is its own LoRA state swapped into the one shared task adapter for a block
(`swapped_adapter`, restored bit for bit), trained with only the LoRA factors trainable
(`lora_training`). Rows are plain text after one start token (`encode_texts`: BOS, or EOS when
the tokenizer has none). Sampling is pure temperature sampling, no top-k / top-p
(`generate_completions`), so that `completion_logprobs` gives the sampler's own log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedlora.model.lora import AdapterState, adapter_parameters, load_adapter_state, set_trainable
from fedlora.synth.great import GreatCodec
from fedlora.model.precision import compute_context
from fedlora.train.batches import collate, forward_logits


@contextmanager
def swapped_adapter(model, state: AdapterState) -> Iterator[None]:
    """Load `state` into the model's adapter for the block; restore the previous contents exactly."""
    saved = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}  # same dtype: bitwise
    load_adapter_state(model, state)
    try:
        yield
    finally:
        load_adapter_state(model, saved)


@contextmanager
def lora_training(model) -> Iterator[list[torch.nn.Parameter]]:
    """LoRA A and B trainable (all else frozen) for the block; flags and train/eval mode restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    mode = model.training
    try:
        yield set_trainable(model, "ab")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(mode)


def model_device(model) -> torch.device:
    return next(iter(adapter_parameters(model).values())).device


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text after one start token (BOS, or EOS when there is no BOS)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None or tokenizer.eos_token_id is None:
        raise ValueError("the generator needs a tokenizer with an EOS token (rows end with EOS)")
    return [[start] + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: list[list[int]], temperature: float,
                         max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[int]]:
    """Sample one completion per prompt (pure temperature sampling: no top-k/top-p), cut after EOS.

    Seeded: the torch RNG is forked, so the caller's global RNG state is untouched.
    """
    if temperature <= 0 or max_new_tokens < 1:
        raise ValueError(f"temperature must be > 0 and max_new_tokens >= 1, got {temperature}, {max_new_tokens}")
    device, pad, eos = model_device(model), pad_id(tokenizer), tokenizer.eos_token_id
    mode, out = model.training, []
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[s : s + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
            with compute_context(model):
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            out += [row[: row.index(eos) + 1] if eos in row else row for row in gen[:, width:].tolist()]
    model.train(mode)
    return out


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) log pi(token | prefix) of each completion token under logits / temperature, and its mask.

    Completions are right-aligned (left padding, as `collate` does); masked entries are 0.
    """
    batch = collate(list(zip(prompt_ids, completion_ids)), pad, model_device(model))
    keep = batch["targets"].shape[1] + 1
    logp = torch.log_softmax(forward_logits(model, batch, keep)[:, :-1] / temperature, dim=-1)
    mask = batch["targets"] != -100
    picked = logp.gather(-1, batch["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def row_token_budget(codec: GreatCodec, tokenizer) -> int:
    """A fallback max_new_tokens: 1.25 x the tokens of a row of every column's longest known value, + 8."""
    widest = {}
    for name in codec.names:
        texts = [t for t, _ in codec.spec["marginals"][name]]
        widest[name] = max(texts, key=len) if texts else "unknown"
    text = ", ".join(f"{codec._text[n]} is {widest[n]}" for n in codec.names)
    return int(1.25 * (len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)) + 8
