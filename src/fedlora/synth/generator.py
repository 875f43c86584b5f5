"""A client's LLM table generator (Concordia level 3, arXiv 2605.09855): GReaT fine-tuning, sampling, reward.

The simulator shares one frozen base model wrapped with ONE LoRA adapter, the task adapter. A
client's generator is its own adapter state (same names and shapes as `adapter_state(model)`)
swapped into that adapter while it fits, samples or is refined (`swapped_adapter`), after which
the previous contents come back bit for bit. Generator state never leaves the client.

Fit (GReaT, Borisov et al. 2023, arXiv 2210.06280): from a fresh LoRA init (A Kaiming-uniform,
B = 0), minimize the causal-LM loss over every token of the serialized real rows plus EOS,
    L = -(1 / sum_i |x_i|) sum_i sum_t log p(x_{i,t} | <bos>, x_{i,<t}),
with a fresh random column order each time a row is drawn; AdamW on the LoRA factors only.
<bos> is the tokenizer's BOS (EOS when it has none); rows are plain text, no chat template.
Sampling starts from `GreatCodec.prompt`, uses pure temperature sampling (no top-k / top-p, so
GRPO's log-probs are those of the sampler) and keeps the rows `GreatCodec.parse` accepts.

Reward: `synth/reward.py` (`RewardComposer`: utility, validity and a copy penalty). The model
plumbing (adapter swaps, tokens, sampling, log-probs) is in `synth/lm.py`. Both are re-exported
here, the names this module always offered.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedlora.data.tables import Table
from fedlora.model.lora import AdapterState, adapter_state, init_adapter_state
from fedlora.synth.great import GreatCodec
from fedlora.synth.lm import (  # noqa: F401  (re-exported: completion_logprobs, generate_completions, ...)
    completion_logprobs,
    encode_texts,
    generate_completions,
    lora_training,
    model_device,
    pad_id,
    row_token_budget,
    swapped_adapter,
)
from fedlora.synth.reward import RewardBreakdown, RewardComposer, RewardConfig  # noqa: F401  (re-exported)
from fedlora.train.batches import collate, target_logprobs
from fedlora.train.local import batch_order


@dataclass
class GeneratorConfig:
    steps: int = 100
    """AdamW steps of the GReaT fit. 100 x 8 rows is 3-8 passes over a 100-250-row client (ours)."""
    batch_size: int = 8
    micro_batch_size: int | None = None
    """Rows per forward pass (gradient accumulation, same result); None: the whole batch."""
    lr: float = 5e-4
    """The task's LoRA learning rate (TrainConfig.lr); LoRA takes ~10x a full fine-tune's rate."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    digits: int = 4
    """Significant digits of numbers; 4 round-trips the built-ins' values exactly."""
    range_margin: float = 0.1
    """A sampled number is plausible within [min, max] of the client's rows +- this x range."""
    start: str = "target"
    """Prompt column: 'target' (class-conditional sampling, GReaT's default use) or 'random'."""
    temperature: float = 0.7
    """GReaT's sampling temperature (arXiv 2210.06280)."""
    max_new_tokens: int | None = None
    """None: 1.25 x the longest serialized real row (in tokens) + 8, set by `fit`."""
    sample_batch_size: int = 32

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.sample_batch_size) < 1:
            raise ValueError("GeneratorConfig: steps, batch_size and sample_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"GeneratorConfig.temperature must be > 0, got {self.temperature}")


@dataclass
class FitResult:
    losses: list[float]
    """Training loss (token-mean NLL of the batch) per step."""

    def __float__(self) -> float:
        return float(np.mean(self.losses))


@dataclass
class SampleResult:
    frame: pd.DataFrame
    """The valid rows, with the table's columns and dtypes."""
    texts: list[str]
    """Every raw sample (prompt + completion)."""
    reasons: list[str | None]
    """Per sample: None if valid, else a `great.REASONS` code."""

    @property
    def validity_rate(self) -> float:
        return sum(r is None for r in self.reasons) / max(len(self.reasons), 1)

    def reason_counts(self) -> dict[str, int]:
        """How many samples failed for each reason (valid ones are not counted)."""
        return dict(sorted(Counter(r for r in self.reasons if r is not None).items()))


# ---------------------------------------------------------------------------------- generator


class TableGenerator:
    """One client's GReaT generator: a codec fitted on its rows and a LoRA state (kept on the client).

    >>> gen = TableGenerator(table)                                        # doctest: +SKIP
    >>> gen.fit(model, tok, client_rows, GeneratorConfig(), rng)           # doctest: +SKIP
    >>> gen.sample(model, tok, 64, rng).validity_rate                      # doctest: +SKIP
    """

    def __init__(self, table: Table, cfg: GeneratorConfig | None = None):
        self.table = table
        self.cfg = cfg or GeneratorConfig()
        self.codec: GreatCodec | None = None
        self.state: AdapterState | None = None
        """The generator's LoRA tensors (same names and shapes as `adapter_state(model)`), fp32 on CPU."""
        self.reference: AdapterState | None = None
        """The state right after `fit`: the KL reference of GRPO with reference='fitted'."""
        self.max_new_tokens: int | None = self.cfg.max_new_tokens

    def _check_fitted(self) -> None:
        if self.state is None or self.codec is None:
            raise ValueError("the generator has no state yet; call fit(...) or load_state_dict(...) first")

    def fit(self, model, tokenizer, frame: pd.DataFrame, cfg: GeneratorConfig | None = None,
            rng: np.random.Generator | None = None) -> FitResult:
        """Codec from `frame`, fresh LoRA init (seed from rng), `cfg.steps` AdamW steps of GReaT fine-tuning.

        Loss: token mean of -log p over each serialized row + EOS (module doc); a row gets a fresh
        column order every time it is drawn.
        """
        cfg = self.cfg = cfg or self.cfg
        rng = rng if rng is not None else np.random.default_rng(0)
        if frame is None or len(frame) == 0:
            raise ValueError("fit needs the client's real training rows; got none (give the client rows)")
        self.codec = GreatCodec(self.table, frame, cfg.digits, cfg.range_margin, cfg.start)
        records = frame[self.codec.names].to_dict("records")
        longest = max(len(ids) for ids in encode_texts(tokenizer, [self.codec.serialize(r, rng) for r in records]))
        self.max_new_tokens = cfg.max_new_tokens or int(1.25 * longest) + 8
        losses = []
        with swapped_adapter(model, init_adapter_state(model, int(rng.integers(2**31)))), \
                lora_training(model) as params:
            model.train()
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for rows in batch_order(len(records), cfg.batch_size, cfg.steps, rng):
                opt.zero_grad(set_to_none=True)
                texts = [self.codec.serialize(records[i], rng) for i in rows]
                losses.append(_lm_loss(model, tokenizer, texts, cfg.micro_batch_size, backward=True))
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
            self.state = adapter_state(model)
        self.reference = {n: t.clone() for n, t in self.state.items()}
        return FitResult(losses)

    @torch.no_grad()
    def nll(self, model, tokenizer, frame: pd.DataFrame, rng: np.random.Generator, batch_size: int = 16) -> float:
        """Mean token NLL of `frame`'s rows (+ EOS, column orders from `rng`) under this generator."""
        self._check_fitted()
        texts = [self.codec.serialize(r, rng) for r in frame[self.codec.names].to_dict("records")]
        tokens = [len(ids) for ids in encode_texts(tokenizer, texts)]  # = row tokens + EOS
        with swapped_adapter(model, self.state):
            mode = model.training
            model.eval()
            total = sum(_lm_loss(model, tokenizer, texts[s : s + batch_size], None, False)
                        * sum(tokens[s : s + batch_size]) for s in range(0, len(texts), batch_size))
            model.train(mode)
        return total / sum(tokens)

    def sample(self, model, tokenizer, n: int, rng: np.random.Generator, temperature: float | None = None,
               max_new_tokens: int | None = None) -> SampleResult:
        """`n` samples from prompts drawn from the client's marginal; the same rng state gives the same samples."""
        self._check_fitted()
        if n <= 0:
            raise ValueError(f"n (the rows to sample, e.g. concordia.synthetic_rows) must be >= 1, got {n}")
        prompts = [self.codec.prompt(rng) for _ in range(n)]
        budget = max_new_tokens or self.max_new_tokens or row_token_budget(self.codec, tokenizer)
        with swapped_adapter(model, self.state):
            completions = generate_completions(model, tokenizer, encode_texts(tokenizer, prompts),
                                               temperature or self.cfg.temperature, budget, int(rng.integers(2**63)),
                                               self.cfg.sample_batch_size)
        return self.parse([p + tokenizer.decode(c, skip_special_tokens=True) for p, c in zip(prompts, completions)])

    def parse(self, texts: list[str]) -> SampleResult:
        """Strictly parse raw samples (prompt + completion) into a SampleResult."""
        self._check_fitted()
        parsed = [self.codec.parse(t) for t in texts]
        return SampleResult(self.codec.to_frame([r for r, _ in parsed if r is not None]), list(texts),
                            [reason for _, reason in parsed])

    # ---------------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors: 'adapter.<name>' (and 'reference.<name>'), safetensors-ready."""
        self._check_fitted()
        out = {f"adapter.{n}": t for n, t in self.state.items()}
        out.update({f"reference.{n}": t for n, t in (self.reference or {}).items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], codec: GreatCodec | dict | None = None) -> None:
        """Inverse of `state_dict`; `codec` (a codec or its spec) is needed unless the generator was fitted."""
        if codec is not None:
            self.codec = codec if isinstance(codec, GreatCodec) else GreatCodec.from_spec(codec)
        if self.codec is None:
            raise ValueError("load_state_dict needs codec=... (the client's GreatCodec or its spec) for a "
                             "generator that was never fitted")
        state = {k[len("adapter."):]: v.clone() for k, v in tensors.items() if k.startswith("adapter.")}
        if not state:
            raise ValueError("no 'adapter.*' tensors given; pass what TableGenerator.state_dict() returned")
        self.state = state
        self.reference = {k[len("reference."):]: v.clone() for k, v in tensors.items()
                          if k.startswith("reference.")} or None

    def save(self, path) -> None:
        """One safetensors file: the tensors, with the codec spec and max_new_tokens as metadata (no pickle)."""
        from safetensors.torch import save_file

        meta = {"codec": json.dumps(self.codec.spec), "max_new_tokens": str(self.max_new_tokens or "")}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path, table: Table, cfg: GeneratorConfig | None = None) -> TableGenerator:
        from safetensors import safe_open

        gen = cls(table, cfg)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        gen.load_state_dict(tensors, json.loads(meta["codec"]))
        gen.max_new_tokens = int(meta["max_new_tokens"]) if meta.get("max_new_tokens") else gen.max_new_tokens
        return gen


def _lm_loss(model, tokenizer, texts: list[str], micro: int | None, backward: bool) -> float:
    """Token-mean NLL of texts + EOS after the start token; backward() per micro-batch when asked."""
    seqs = [(ids[:1], ids[1:] + [tokenizer.eos_token_id]) for ids in encode_texts(tokenizer, texts)]
    total, out, micro = sum(len(t) for _, t in seqs), 0.0, micro or len(seqs)
    for s in range(0, len(seqs), micro):
        logp, _ = target_logprobs(model, collate(seqs[s : s + micro], pad_id(tokenizer), model_device(model)))
        loss = -logp.sum() / total
        if backward:
            loss.backward()
        out += float(loss.detach())
    return out
