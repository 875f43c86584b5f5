"""Generation records to token-level examples: prompt tokens, response tokens, length buckets.

An example is `prompt tokens + response tokens`; training puts the loss on the response tokens
only, through the same left-padded `collate` and `target_logprobs` as label scoring (the targets
are the response, so every prompt position carries label -100 in the usual causal-LM form,
`causal_lm_labels`). The response ends with the turn's end token (the chat template's, e.g.
`<|im_end|>`, or EOS), so the model learns to stop and greedy decoding knows where to.

Serialization (`render`): with a chat template (`data.prompt_style` auto or chat), the turns
before the answer go through `apply_chat_template(..., add_generation_prompt=True)` and the
response is the answer text followed by the end marker the template writes after an assistant
turn. Without one (plain), the prompt is BOS + `System: ...` (if any) + `User: ...` /
`Assistant: ...` lines + `Assistant:`, and the response is ' ' + answer + EOS.

Truncation (`fit`) never cuts the response's start: an over-long prompt loses tokens from the
left (its end, the question and the assistant header, stays); a response that leaves fewer than
MIN_PROMPT_TOKENS for the prompt loses its tail; a response longer than data.max_length on its own
is an error naming the record's line. Cuts are counted in one warning per encoded set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fedlora.data.schema import DataError

MIN_PROMPT_TOKENS = 16
"""Tokens of the prompt's end always kept: the chat template's assistant header is about 5 tokens
and the question's last words the rest, without which the response has nothing to answer."""
BUCKET_WINDOW = 8
"""Batches per sorting window of `bucket_by_length`. Sorting 8 batches' rows by length and cutting
them in order gives each batch rows of similar length; the window keeps batches a random draw
(an example waits at most 8 batches for its turn) rather than one global sort."""
SENTINEL = "\x00fedlora-answer\x00"


@dataclass
class GenerationExamples:
    """Prompts and responses as token ids, and what evaluation needs beside them."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    references: list[str]
    """The reference responses as text (ROUGE and exact match compare against these)."""
    prompts: list[str] = field(default_factory=list)
    """The user's last message of each record (for samples.jsonl)."""
    lines: list[int] = field(default_factory=list)
    name: str = ""
    """Which set this is ('client 0 test', 'global test'), written beside its samples."""
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end an answer (EOS and the template's end-of-turn token)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        """(prompt, target) of example i, as `local_train` feeds `collate`."""
        return self.prompt_ids[i], self.response_ids[i]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)], dtype=np.int64)

    def subset(self, rows) -> GenerationExamples:
        take = lambda xs: [xs[i] for i in rows] if xs else []
        return GenerationExamples(take(self.prompt_ids), take(self.response_ids), take(self.references),
                                  take(self.prompts), take(self.lines), self.name, self.stop_ids)

    @staticmethod
    def concat(parts: list[GenerationExamples], name: str = "pooled") -> GenerationExamples:
        """Several sets as one (the centralized reference pools every client's training rows)."""
        cat = lambda attr: [x for p in parts for x in getattr(p, attr)]
        return GenerationExamples(cat("prompt_ids"), cat("response_ids"), cat("references"), cat("prompts"),
                                  cat("lines"), name, parts[0].stop_ids if parts else [])


def uses_template(tokenizer, style: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has:
        raise ValueError("data.prompt_style=chat needs a tokenizer with a chat template; use plain or auto")
    return has and style != "plain"


def end_marker(tokenizer) -> str:
    """What the chat template writes right after an assistant turn's content, without trailing
    whitespace ('<|im_end|>' for ChatML templates such as SmolLM2's); EOS when it writes nothing."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    tail = text.split(SENTINEL, 1)[1].rstrip() if SENTINEL in text else ""
    return tail or (tokenizer.eos_token or "")


def render(tokenizer, chat: list[dict], answer: str, templated: bool) -> tuple[str, str]:
    """(prompt text, response text) of one record; the prompt holds special tokens already."""
    if templated:
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return prompt, answer + end_marker(tokenizer)
    bos = tokenizer.bos_token or ""
    lines = [f"{t['role'].capitalize()}: {t['content']}" for t in chat]
    return bos + "\n".join(lines) + "\nAssistant:", " " + answer + (tokenizer.eos_token or "")


def fit(prompt: list[int], response: list[int], max_length: int, where: str) -> tuple[list[int], list[int], str]:
    """Cut (prompt, response) to max_length tokens: the prompt from the left, the response's tail
    only when it leaves under MIN_PROMPT_TOKENS for the prompt. Also says what was cut ('' if nothing)."""
    if len(response) > max_length:
        raise DataError(f"{where}: the response is {len(response)} tokens, longer than data.max_length="
                        f"{max_length} on its own; raise data.max_length or shorten or split that response")
    keep_prompt = min(len(prompt), MIN_PROMPT_TOKENS)
    cut = ""
    if len(response) > max_length - keep_prompt:
        response, cut = response[: max_length - keep_prompt], "response"
    room = max_length - len(response)
    if len(prompt) > room:
        prompt, cut = prompt[len(prompt) - room:], cut or "prompt"
    return prompt, response, cut


def stop_tokens(tokenizer, templated: bool) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if templated:
        marker = tokenizer(end_marker(tokenizer), add_special_tokens=False)["input_ids"]
        if len(marker) == 1 and marker[0] not in ids:
            ids.append(marker[0])
    return ids


def encode_generation(tokenizer, frame: pd.DataFrame, max_length: int, style: str = "auto",
                      name: str = "") -> GenerationExamples:
    """Tokenize generation records (`data.generation.read_records` rows); see the module doc."""
    templated = uses_template(tokenizer, style)
    stops = stop_tokens(tokenizer, templated)
    if len(frame) == 0:
        return GenerationExamples([], [], [], [], [], name, stops)
    texts = [render(tokenizer, chat, answer, templated) for chat, answer in zip(frame["_chat"], frame["response"])]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
    lines = [int(x) for x in frame["_line"]]
    out_p, out_r, cuts = [], [], {"prompt": [], "response": []}
    for p, r, line in zip(prompts, responses, lines):
        p, r, cut = fit(p, r, max_length, f"record on line {line}")
        out_p.append(p)
        out_r.append(r)
        if cut:
            cuts[cut].append(line)
    for what, where in (("prompt", "from the left"), ("response", "at its tail")):
        if cuts[what]:
            shown = ", ".join(map(str, cuts[what][:5])) + (", ..." if len(cuts[what]) > 5 else "")
            warnings.warn(f"{name or 'generation records'}: {len(cuts[what])} {what}(s) cut {where} to fit "
                          f"data.max_length={max_length} (line {shown}); raise data.max_length to keep them whole",
                          stacklevel=2)
    return GenerationExamples(out_p, out_r, list(frame["response"]), list(frame["prompt"]), lines, name, stops)


def bucket_by_length(batches: list[np.ndarray], lengths: np.ndarray, rng: np.random.Generator,
                     window: int = BUCKET_WINDOW) -> list[np.ndarray]:
    """Re-cut `batches` (a random draw, `local.batch_order`) so each holds rows of similar length.

    Within every window of `window` batches the rows are sorted by length (stable, so ties keep
    their random order) and cut back into batches of the same sizes, whose order within the window
    is then shuffled with `rng`, so long and short batches still alternate. The multiset of rows
    in each window, hence in each epoch, is unchanged.
    """
    out: list[np.ndarray] = []
    for start in range(0, len(batches), window):
        group = batches[start : start + window]
        rows = np.concatenate(group)
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        cuts = np.cumsum([len(b) for b in group])[:-1]
        pieces = np.split(rows, cuts)
        out.extend(pieces[k] for k in rng.permutation(len(pieces)))
    return out


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """Share of a padded batch that is padding, over all `batches` (what bucketing lowers)."""
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - float(sum(int(lengths[b].sum()) for b in batches)) / padded


def causal_lm_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [B, width] labels of a `collate` batch in the usual causal-LM form: the target token at
    its input position, -100 at prompt and padding positions. `target_logprobs` computes the same
    loss from the last positions only; this form is for checks against `model(labels=...)`."""
    ids, targets = batch["input_ids"], batch["targets"]
    labels = torch.full_like(ids, -100)
    k = targets.shape[1]
    labels[:, ids.shape[1] - k:] = targets
    return labels
