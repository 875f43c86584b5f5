"""GRPO for a client's table generator (Shao et al. 2024, arXiv 2402.03300; DeepSeek-R1, 2501.12948).

For each prompt q, sample G completions o_1..o_G from the current generator pi_old, score them,
and use the group-normalized reward as every token's advantage:
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)                  (std with Bessel's correction, as TRL)
Then maximize, over the LoRA factors only,
    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-e, 1+e) A_i) - beta KL_it ],
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),
    KL_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3 estimator, >= 0)
with pi_ref the base model (the adapter disabled) or, as an option, the generator right after
its GReaT fit. Log-probs are of logits / temperature, the distribution the tokens were sampled
from (pure temperature sampling, no top-k/top-p), so rho = 1 exactly on the first update.

Defaults and why (the Concordia paper gives none; all ours): G = 8 and 4 prompts per step
(TRL's num_generations = 8), one update per sampled batch (mu = 1 in DeepSeekMath, TRL's
num_iterations = 1), e = 0.2 (PPO / TRL), beta = 0.04 (DeepSeekMath; recent TRL defaults to 0),
lr 5e-5 (LoRA; TRL's 1e-6 is for full fine-tuning), temperature 0.7 (the generator's sampling
temperature, so the policy refined is the one used to sample tables).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.model.lora import adapter_state
from fedlora.synth.lm import (
    completion_logprobs,
    encode_texts,
    generate_completions,
    lora_training,
    pad_id,
    row_token_budget,
    swapped_adapter,
)

NORMALIZE = ("sequence", "token")
REFERENCES = ("base", "fitted")


@dataclass
class GRPOConfig:
    group_size: int = 8
    """G, completions per prompt (>= 2: a group of one has no baseline)."""
    prompts_per_step: int = 4
    """Prompts per step, drawn from the generator's codec (G x prompts completions per step)."""
    steps: int = 10
    """GRPO steps per `refine` call (one AdamW across them)."""
    iterations: int = 1
    """Optimizer updates per sampled batch (mu); > 1 reuses the samples with clipped ratios."""
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    clip_eps: float = 0.2
    beta: float = 0.04
    """KL weight; 0 skips the reference forward pass."""
    reference: str = "base"
    """'base': the model with the adapter disabled (the lead's design); 'fitted': the generator's
    state right after its GReaT fit (DeepSeekMath's choice: the SFT model as reference)."""
    temperature: float = 0.7
    max_new_tokens: int | None = None
    """None: the generator's own limit (1.25 x its longest real row + 8)."""
    normalize: str = "sequence"
    """'sequence': mean over each completion's tokens, then over completions (DeepSeekMath, TRL's
    loss_type='grpo'); 'token': sum over all tokens / their number (DAPO; TRL's recent default)."""
    adv_eps: float = 1e-4
    micro_batch_size: int = 8
    """Completions per forward pass with gradients (accumulated; same result as one pass)."""
    generation_batch_size: int = 32

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 (a group needs a baseline), got {self.group_size}")
        if min(self.prompts_per_step, self.steps, self.iterations, self.micro_batch_size,
               self.generation_batch_size) < 1:
            raise ValueError("GRPOConfig: prompts_per_step, steps, iterations and batch sizes must be >= 1")
        if self.normalize not in NORMALIZE or self.reference not in REFERENCES:
            raise ValueError(f"GRPOConfig: normalize must be one of {NORMALIZE} and reference one of {REFERENCES}")
        if self.temperature <= 0 or self.clip_eps <= 0 or self.beta < 0:
            raise ValueError("GRPOConfig: temperature and clip_eps must be > 0 and beta >= 0")


@dataclass
class GRPOStats:
    reward_mean: float
    reward_std: float
    kl: float
    """Token-mean k3 KL to the reference before each update (NaN when beta = 0: not computed)."""
    clip_fraction: float
    """Share of tokens whose clipped term was the smaller one (0 when iterations = 1)."""
    loss: float
    """kl, clip_fraction and loss are means over the step's `iterations` updates."""
    validity: float
    """Share of completions that parse (NaN when the reward does not report `.valid`)."""
    zero_std_groups: float
    """Share of groups whose rewards are all equal: they teach nothing."""
    completion_tokens: float
    """Mean tokens per completion (EOS included)."""
    extra: dict = field(default_factory=dict)
    """Numeric extras the reward reported (e.g. 'copies')."""


def group_advantages(rewards, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """(r - group mean) / (group std + eps) for rewards laid out group after group.

    std uses Bessel's correction (ddof=1, as TRL); a group of equal rewards gets 0.

    >>> group_advantages([1.0, 3.0, 2.0, 2.0], 2).round(3).tolist()
    [-0.707, 0.707, 0.0, 0.0]
    """
    r = np.asarray(rewards, dtype=float)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if r.ndim != 1 or len(r) == 0 or len(r) % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}; pass a 1-D array "
                         "holding group_size rewards per prompt, group after group")
    groups = r.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    scale = groups.std(axis=1, ddof=1, keepdims=True) + eps
    equal = groups.max(axis=1, keepdims=True) == groups.min(axis=1, keepdims=True)  # 0, also with eps = 0
    return np.where(equal, 0.0, centered / np.where(equal, 1.0, scale)).reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              normalize: str = "sequence") -> torch.Tensor:
    """-J (see module doc) over (G, T) token log-probs; `mask` marks completion tokens.

    'sequence' (default): -1/G sum_i 1/|o_i| sum_t [...], the paper's normalization, which gives
    each completion the same weight whatever its length. 'token': -sum_it [...] / sum_i |o_i|, as
    TRL's GRPOTrainer does by default in recent versions (loss_type 'dapo'; 'bnpo' before).
    With beta = 0 and logp = old_logp the loss is -mean_i A_i ('sequence') or the token-weighted
    -sum_i |o_i| A_i / sum_i |o_i| ('token'). `ref_logp` may be None when beta = 0.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (or set beta = 0)")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    per_token = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta != 0:
        per_token = per_token - beta * k3_kl(logp, ref_logp)
    if normalize == "sequence":
        return -((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return -(per_token * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(pi || ref) under pi (Schulman)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_tokens(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   clip_eps: float) -> torch.Tensor:
    """Where the clipped term is the smaller one (no gradient flows): rho < 1-e with A < 0, or rho > 1+e with A > 0."""
    ratio, adv = torch.exp(logp - old_logp), advantages.unsqueeze(1)
    return ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))


def _rewards(out, n: int) -> tuple[np.ndarray, float, dict]:
    """A reward function's answer -> (rewards, validity or NaN, numeric extras).

    Accepts an array, or an object with `.reward` (and optionally `.valid`, `.copies`) such as
    `RewardBreakdown`.
    """
    extra, validity = {}, float("nan")
    if hasattr(out, "reward"):
        if getattr(out, "valid", None) is not None:
            validity = float(np.mean(out.valid))
        if getattr(out, "copies", None) is not None:
            extra["copies"] = float(np.sum(out.copies))
        out = out.reward
    reward = np.asarray(out, dtype=float).reshape(-1)
    if reward.shape != (n,) or not np.isfinite(reward).all():
        raise ValueError(f"reward_fn must return {n} finite rewards (or an object with .reward), got {reward.shape}")
    return reward, validity, extra


def grpo_step(model, tokenizer, prompts: list[str], reward_fn: Callable, cfg: GRPOConfig,
              rng: np.random.Generator, optimizer: torch.optim.Optimizer | None = None,
              ref_state: dict | None = None, max_new_tokens: int | None = None) -> GRPOStats:
    """One GRPO step on the adapter now loaded in `model`; only its LoRA factors move.

    For each prompt, G completions are sampled from the current adapter; `reward_fn(texts)` scores
    the prompt + completion texts (an array, or an object with `.reward` like `RewardBreakdown`);
    then `cfg.iterations` AdamW updates on `grpo_loss`. `ref_state`: an adapter state to use as
    the reference instead of the adapter-disabled model. Pass one `optimizer` across steps to keep
    AdamW's moments (a fresh one is made otherwise). `max_new_tokens` defaults to
    cfg.max_new_tokens, else 128.
    """
    G = cfg.group_size
    if not prompts:
        raise ValueError("grpo_step needs at least one prompt (e.g. [codec.prompt(rng)])")
    prompt_ids = [ids for ids in encode_texts(tokenizer, prompts) for _ in range(G)]
    with lora_training(model) as params:
        optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        completions = generate_completions(model, tokenizer, prompt_ids, cfg.temperature,
                                           max_new_tokens or cfg.max_new_tokens or 128, int(rng.integers(2**63)),
                                           cfg.generation_batch_size)
        texts = [p + tokenizer.decode(c, skip_special_tokens=True)
                 for p, c in zip([p for p in prompts for _ in range(G)], completions)]
        rewards, validity, extra = _rewards(reward_fn(texts), len(texts))
        adv = group_advantages(rewards, G, cfg.adv_eps)
        n, pad = len(texts), pad_id(tokenizer)
        total_tokens = sum(len(c) for c in completions)
        chunks = [slice(s, s + cfg.micro_batch_size) for s in range(0, n, cfg.micro_batch_size)]

        def logprobs(sl):
            return completion_logprobs(model, prompt_ids[sl], completions[sl], pad, cfg.temperature)

        model.eval()  # no dropout: the ratio compares the same function of the weights
        with torch.no_grad():
            old = [logprobs(sl)[0] for sl in chunks] if cfg.iterations > 1 else None
            ref = _reference_logprobs(model, chunks, logprobs, cfg.beta, ref_state)
        loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0  # summed over iterations, reported as means
        for _ in range(cfg.iterations):
            optimizer.zero_grad(set_to_none=True)
            for k, sl in enumerate(chunks):
                logp, mask = logprobs(sl)
                old_k = old[k] if old is not None else logp.detach()  # mu = 1: ratio = 1, as in TRL
                a = torch.as_tensor(adv[sl], dtype=logp.dtype, device=logp.device)
                # each chunk's loss is a mean over its part; weighting by its share gives the batch loss
                weight = len(completions[sl]) / n if cfg.normalize == "sequence" else float(mask.sum()) / total_tokens
                loss = grpo_loss(logp, old_k, None if ref is None else ref[k], a, mask, cfg.clip_eps,
                                 cfg.beta, cfg.normalize) * weight
                loss.backward()
                loss_sum += float(loss.detach())
                with torch.no_grad():
                    clip_sum += float((clipped_tokens(logp, old_k, a, cfg.clip_eps) & mask).sum())
                    if ref is not None:
                        kl_sum += float((k3_kl(logp, ref[k]) * mask).sum())
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    groups = rewards.reshape(-1, G)
    return GRPOStats(
        reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
        kl=kl_sum / (total_tokens * cfg.iterations) if ref is not None else float("nan"),
        clip_fraction=clip_sum / (total_tokens * cfg.iterations), loss=loss_sum / cfg.iterations, validity=validity,
        zero_std_groups=float(np.mean(groups.max(1) == groups.min(1))),
        completion_tokens=total_tokens / n, extra=extra,
    )


@torch.no_grad()
def _reference_logprobs(model, chunks, logprobs, beta: float, ref_state) -> list | None:
    if beta == 0:
        return None
    if ref_state is not None:
        with swapped_adapter(model, ref_state):
            return [logprobs(sl)[0] for sl in chunks]
    with model.disable_adapter():
        return [logprobs(sl)[0] for sl in chunks]


def refine(generator, model, tokenizer, reward_fn: Callable, cfg: GRPOConfig,
           rng: np.random.Generator, steps: int | None = None) -> list[GRPOStats]:
    """`steps` (default cfg.steps) GRPO steps on a fitted `TableGenerator`, prompts from its codec.

    The generator's state is swapped into the shared adapter and written back to
    `generator.state` at the end; the adapter's previous contents (the task LoRA) are restored
    and base weights never change. One AdamW per call (its moments start fresh each call).
    """
    generator._check_fitted()
    ref_state = generator.reference if cfg.reference == "fitted" else None
    if cfg.reference == "fitted" and ref_state is None:
        raise ValueError("GRPOConfig.reference='fitted' needs a generator fitted (or loaded) with its reference "
                         "state; use reference='base' otherwise")
    budget = cfg.max_new_tokens or generator.max_new_tokens or row_token_budget(generator.codec, tokenizer)
    history = []
    with swapped_adapter(model, generator.state), lora_training(model) as params:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        for _ in range(cfg.steps if steps is None else steps):
            prompts = [generator.codec.prompt(rng) for _ in range(cfg.prompts_per_step)]
            history.append(grpo_step(model, tokenizer, prompts, reward_fn, cfg, rng, optimizer, ref_state, budget))
        generator.state = adapter_state(model)
    return history
