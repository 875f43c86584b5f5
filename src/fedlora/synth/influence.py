"""Concordia level 2 (arXiv 2605.09855): the influence targets a client's utility scorer is trained on.

The target of a synthetic row s is its first-order influence on the client's private validation loss,

    u(s) = < grad_theta l(theta; s), grad_theta L_val,k(theta) >,   theta = the task-LoRA factors,

with l the per-example loss of local training (`train/local.py`: minus the mean log-probability of
the answer tokens) and L_val,k the mean of l over the client's validation rows. u(s) > 0 means a
gradient step on s lowers the validation loss, to first order: theta - eta grad l(s) changes
L_val by -eta u(s) + O(eta^2). `influence_targets` computes it by a central finite difference along
the validation gradient ('fd', the default) or by a backward per example ('exact', the reference).
Validation rows, their gradients and the targets never leave the client.

The paper's body is not available (research note, section 3, marked [A]): the influence target is
our (D) design choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from fedlora.train.batches import EncodedExamples, collate, target_logprobs

INFLUENCE_METHODS = ("fd", "exact")


def _example_losses(model, data: EncodedExamples, rows: Sequence[int], pad_id: int,
                    device: torch.device) -> torch.Tensor:
    """l_i = -(1/|T_i|) sum_t log p(answer token t), the per-example loss of local training."""
    pairs = [(data.prompt_ids[i], data.verbalizer_ids[data.labels[i]]) for i in rows]
    logp, count = target_logprobs(model, collate(pairs, pad_id, device))
    return -logp / count


@contextmanager
def _grad_scope(model, params: Sequence[torch.nn.Parameter]):
    """Eval mode (no dropout: influence must be deterministic) and params requiring grad; restored."""
    was_training, flags = model.training, [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _val_gradient(model, params, val: EncodedExamples, pad_id: int, batch_size: int) -> list[torch.Tensor]:
    device, total = params[0].device, [torch.zeros_like(p) for p in params]
    for start in range(0, len(val), batch_size):
        rows = range(start, min(start + batch_size, len(val)))
        loss = _example_losses(model, val, rows, pad_id, device).sum() / len(val)
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc.add_(g)
    return total


def influence_targets(model, params: Sequence[torch.nn.Parameter], data: EncodedExamples,
                      val: EncodedExamples, pad_id: int, batch_size: int = 16, *,
                      method: str = "fd", fd_step: float | None = None) -> np.ndarray:
    """u_i = <grad l_i, g>, g = grad L_val, over `params` (the LoRA factors), for each row of `data`.

    'fd' (default): one batched backward for g, then the central difference along g,
        u_i ~= (l_i(theta + eps g) - l_i(theta - eps g)) / (2 eps),  eps = fd_step / ||g||,
    i.e. two batched forward passes over `data` and no per-example backward. Its error is
    O(fd_step^2) (curvature) plus rounding ~1e-7 |l| / fd_step in fp32. Measured on the tiny model
    vs 'exact': relative L2 error 4-5e-4 at fd_step=1e-2 in fp32 (1.3e-4 at 1e-3, but a larger
    model's rounding noise favours the larger step); with 16-bit weights rounding dominates small
    steps, and 3e-2 (the 16-bit default) gave 1.6e-2 (bf16's own exact influence is 5e-3 off fp32's).
    Forward-mode AD (torch.func.jvp) would be exact in one pass, and the double-backward JVP trick
    exact in one batched pass, but torch implements neither through its fused attention kernels
    (checked on torch 2.13 CPU SDPA), so FD is the method that runs on any model and device.
    'exact': a backward per example (the reference the tests compare against).
    The parameters are restored bitwise, the model's train/eval mode and requires_grad flags too.
    Returns float64 (len(data),); all zeros when g = 0 (e.g. only A trainable while B = 0).
    """
    if method not in INFLUENCE_METHODS:
        raise ValueError(f"influence method {method!r} is not one of {INFLUENCE_METHODS}")
    if len(data) == 0 or len(val) == 0:
        raise ValueError(f"influence_targets needs rows to score ({len(data)}) and validation rows "
                         f"({len(val)}); give the client a non-empty validation split")
    params = list(params)
    if not params:
        raise ValueError("influence_targets needs the LoRA parameters (set_trainable(model, 'ab'))")
    with _grad_scope(model, params):
        g = _val_gradient(model, params, val, pad_id, batch_size)
        norm = float(torch.sqrt(sum((x.float() ** 2).sum() for x in g)))
        if norm == 0.0:
            return np.zeros(len(data))
        if method == "exact":
            return _exact(model, params, g, data, pad_id)
        if fd_step is None:  # 16-bit anywhere in the model (PEFT keeps adapters fp32 over a bf16 base)
            low = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
            fd_step = 3e-2 if low else 1e-2
        if not fd_step > 0:
            raise ValueError(f"fd_step must be > 0, got {fd_step}")
        return _finite_difference(model, params, g, fd_step / norm, data, pad_id, batch_size)


def _exact(model, params, g, data: EncodedExamples, pad_id: int) -> np.ndarray:
    out = np.zeros(len(data))
    for i in range(len(data)):
        grads = torch.autograd.grad(_example_losses(model, data, [i], pad_id, params[0].device).sum(), params)
        out[i] = float(sum((a.float() * b.float()).sum() for a, b in zip(grads, g)))
    return out


@torch.no_grad()
def _finite_difference(model, params, g, eps: float, data: EncodedExamples, pad_id: int,
                       batch_size: int) -> np.ndarray:
    saved = [p.detach().clone() for p in params]
    shifted = []
    try:
        for sign in (1.0, -1.0):
            for p, p0, d in zip(params, saved, g):
                p.copy_(p0 + sign * eps * d)
            shifted.append(torch.cat([
                _example_losses(model, data, range(s, min(s + batch_size, len(data))), pad_id, params[0].device)
                for s in range(0, len(data), batch_size)]))
    finally:
        for p, p0 in zip(params, saved):
            p.copy_(p0)
    return ((shifted[0] - shifted[1]).double() / (2 * eps)).cpu().numpy()
