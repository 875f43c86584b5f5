"""Token-level examples for classification by label likelihood (TabLLM style).

An example is `prompt tokens + verbalizer tokens of its label`. Training puts the loss on the
verbalizer tokens only; evaluation scores every class's verbalizer after the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlora.model.precision import compute_context


@dataclass
class EncodedExamples:
    """Prompts as token ids, their labels, and each class's verbalizer token ids."""

    prompt_ids: list[list[int]]
    labels: np.ndarray
    verbalizer_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, rows: np.ndarray) -> "EncodedExamples":
        return EncodedExamples([self.prompt_ids[i] for i in rows], self.labels[rows], self.verbalizer_ids)

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        """(prompt, target) of example i: its prompt and its label's verbalizer, as training feeds `collate`."""
        return self.prompt_ids[i], self.verbalizer_ids[self.labels[i]]


def format_prompts(tokenizer, prompts: list[str], style: str = "auto",
                   system: str | None = "Answer with one of the options.") -> tuple[list[str], bool]:
    """Wrap serialized rows for the model; returns (texts, whether they already hold special tokens).

    'chat' puts the row and question in a user turn and `Answer:` at the start of the assistant
    turn, using the tokenizer's own chat template. For an instruct model this matters: measured
    on SmolLM2-135M-Instruct (breast cancer, quantile words), the mean negative log-likelihood of
    the true label before any training is 1.2 in chat form and 13 in plain form, so LoRA spends
    its first steps on the task instead of on the answer format. 'auto' picks 'chat' when the
    tokenizer has a template, else 'plain' (BOS + text).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        style = "chat" if has_template else "plain"
    if style == "plain":
        return list(prompts), False
    if not has_template:
        raise ValueError("data.prompt_style=chat needs a tokenizer with a chat template; use plain")
    texts = []
    for prompt in prompts:
        body, _, answer = prompt.rpartition("\n")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body}]
        wrapped = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(wrapped + answer)
    return texts, True


def encode_examples(tokenizer, prompts: list[str], labels: np.ndarray, verbalizers: list[str],
                    max_length: int, style: str = "auto", system: str | None = None) -> EncodedExamples:
    """Tokenize prompts once; over-long prompts keep their *end* (the question and `Answer:`).

    `style` and `system` are passed to `format_prompts` (the prompt's last line, `Answer:`,
    becomes the start of the model's answer).
    """
    verbalizer_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    if any(len(v) == 0 for v in verbalizer_ids):
        raise ValueError(f"a verbalizer tokenizes to nothing: {verbalizers}")
    if len({tuple(v) for v in verbalizer_ids}) != len(verbalizer_ids):
        raise ValueError(f"two verbalizers tokenize identically: {verbalizers}")
    budget = max_length - max(len(v) for v in verbalizer_ids)
    if budget < 8:
        raise ValueError(f"data.max_length={max_length} leaves no room for the prompt")
    if not prompts:  # e.g. no global test (data.global_test_fraction=0); tokenizers fail on []
        return EncodedExamples([], np.zeros(0, dtype=np.int64), verbalizer_ids)
    texts, wrapped = format_prompts(tokenizer, prompts, style, system)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not wrapped else []
    prompt_ids = [bos + ids[-(budget - len(bos)):] for ids in encoded]
    return EncodedExamples(prompt_ids, np.asarray(labels, dtype=np.int64), verbalizer_ids)


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad (prompt, target) pairs so every target ends at the last position.

    Left padding lets the model compute logits for the last few positions only
    (`logits_to_keep`), which skips the vocabulary projection over the whole prompt: with a
    49k-token vocabulary that projection is a large share of a forward pass. Explicit position
    ids keep every row's positions starting at 0, so padding never changes a score.
    """
    width = max(len(p) + len(t) for p, t in sequences)
    keep = max(len(t) for _, t in sequences) + 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), keep - 1), -100, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, target) in enumerate(sequences):
        ids = prompt + target
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
        targets[row, keep - 1 - len(target):] = torch.tensor(target)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
            "position_ids": positions.to(device), "targets": targets.to(device)}


def forward_logits(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """fp32 logits of the last `keep` positions: the one forward pass every fedlora path uses.

    It runs in the model's compute precision (model/precision.py: bf16 autocast or fp32) and with
    `use_cache=False`: no caller reads a KV cache from it, and building one costs about 10 % of a
    scoring forward here.
    """
    with compute_context(model, width=batch["input_ids"].shape[1]):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
    return logits[:, -keep:].float()


def target_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(target token) and the number of target tokens."""
    keep = batch["targets"].shape[1] + 1
    logits = forward_logits(model, batch, keep)[:, :-1]
    targets = batch["targets"]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)
