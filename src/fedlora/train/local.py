"""The one local training loop every method uses.

Loss: for example i with answer tokens T_i, l_i = -(1/|T_i|) sum_{t in T_i} log p(t | prefix);
the batch loss is sum_i w_i l_i / sum_i w_i (w_i = 1 unless per-sample weights are given, as
Concordia does). AdamW (or bitsandbytes' paged 8-bit AdamW on CUDA) on the trainable LoRA factors only, gradient clipping, micro-batching
(gradient accumulation with the same result as one big batch), and an optional extra loss term
(FedProx's proximal term, a regularizer) supplied by the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.config import TrainConfig
from fedlora.model.precision import make_optimizer
from fedlora.report.progress import track_steps
from fedlora.train.batches import EncodedExamples, collate, target_logprobs
from fedlora.train.gen_encode import GenerationExamples, bucket_by_length


@dataclass
class LocalResult:
    loss: float
    """Mean training loss over the local steps."""
    steps: int
    examples: int
    """Examples processed (with repetition)."""
    optimizer_state: dict | None
    """AdamW state to keep for the next round (None when the policy is 'reset')."""


def num_local_steps(cfg: TrainConfig, num_rows: int) -> int:
    """`local_steps`, or ceil(local_epochs * rows / batch_size) when epochs are given."""
    if cfg.local_epochs is not None:
        return max(1, math.ceil(cfg.local_epochs * num_rows / cfg.batch_size))
    return cfg.local_steps


def batch_order(num_rows: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches drawn epoch by epoch from fresh permutations (no row repeats within an epoch)."""
    order: list[int] = []
    need = steps * min(batch_size, num_rows)
    while len(order) < need:
        order.extend(rng.permutation(num_rows).tolist())
    size = min(batch_size, num_rows)
    return [np.asarray(order[k * size : (k + 1) * size]) for k in range(steps)]


def local_train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: EncodedExamples | GenerationExamples,
    cfg: TrainConfig,
    steps: int,
    rng: np.random.Generator,
    pad_id: int,
    sample_weights: np.ndarray | None = None,
    optimizer_state: dict | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    progress: str | None = None,
) -> LocalResult:
    """Run `steps` AdamW steps on `params` over `data`; the model's other weights stay frozen.

    `progress`, when given, labels the steps on the progress display already on screen (a row of
    the round bar, report/progress.py); with no display, or output that is not a terminal, nothing.
    """
    if len(data) == 0:
        raise ValueError("a client has no training rows; use fewer clients or a larger partition.min_rows")
    device = params[0].device
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None and cfg.optimizer_state == "keep":
        optimizer.load_state_dict(optimizer_state)
    micro = cfg.micro_batch_size or cfg.batch_size
    model.train()
    losses = []
    batches = batch_order(len(data), cfg.batch_size, steps, rng)
    if isinstance(data, GenerationExamples):  # free-form responses vary in length: bucket them
        batches = bucket_by_length(batches, data.lengths, rng)
    for rows in track_steps(batches, progress):
        optimizer.zero_grad(set_to_none=True)
        weights = np.ones(len(rows)) if sample_weights is None else sample_weights[rows]
        total_weight = float(weights.sum())
        if total_weight <= 0:
            raise ValueError("sample weights of a batch sum to zero; weights must be >= 0 and not all 0")
        step_loss = 0.0
        for start in range(0, len(rows), micro):
            chunk = rows[start : start + micro]
            pairs = [data.pair(i) for i in chunk]
            logp, count = target_logprobs(model, collate(pairs, pad_id, device))
            w = torch.as_tensor(weights[start : start + micro], dtype=logp.dtype, device=device)
            loss = -(w * logp / count).sum() / total_weight
            loss.backward()
            step_loss += float(loss.detach())
        if extra_loss is not None:
            term = extra_loss()
            term.backward()
            step_loss += float(term.detach())
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
    model.eval()
    kept = _cpu_state(optimizer.state_dict()) if cfg.optimizer_state == "keep" else None
    return LocalResult(float(np.mean(losses)), steps, steps * min(cfg.batch_size, len(data)), kept)


def _cpu_state(state: dict) -> dict:
    """A detached CPU copy of an optimizer state_dict (so clients' states do not hold GPU memory)."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value
    return copy(state)
