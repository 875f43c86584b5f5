"""A second, frozen LoRA branch mixed with the trainable one by a learnable per-layer weight.

For an adapted linear layer in transformer block l, with PEFT's own (trainable) branch B A and
this module's frozen branch B_e A_e:

    h = W0 x + s * ( lambda_l * B A x~  +  (1 - lambda_l) * B_e A_e x~ ),   lambda_l = sigmoid(theta_l)

where x~ is the LoRA-dropout input PEFT already computes and s = alpha / r. FedTreeLoRA uses it
for its cluster expert (B A) and external expert (B_e A_e); FedDPA/FedALT-style global + local
mixing fits the same shape.

Why hooks and not a LoRA layer of our own: PEFT keeps target-module resolution, merging and the
standard adapter export, and the frozen branch and theta are ordinary `nn.Parameter`s named
`<module>.mix_ext_A`, `<module>.mix_ext_B` and `model.layers.<l>.mix_logit`, so
they travel through the same named-tensor adapter state as A and B (see `model/lora.py`). The
hooks sit on PEFT's `lora_A` (to see x~) and `lora_B` (to mix), so dropout is shared by both
branches. Layers not listed are untouched: with no mixed layer the model computes bit for bit
what plain PEFT computes (FedTreeLoRA's one-cluster limit is exactly FedIT).
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.model.lora import _ADAPTER, lora_layers

# No "lora_" in these names: PEFT exports every parameter whose name contains it.
EXT_A, EXT_B, MIX = "mix_ext_A", "mix_ext_B", "mix_logit"


def _decoder_layers(model) -> nn.ModuleList:
    """The list of transformer blocks ('model.layers' in Llama-style models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = base
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise ValueError("cannot find the transformer blocks of this model to attach per-layer mixing")


class _Mixer:
    """The pair of hooks on one LoRA layer: stash x~ at lora_A, mix at lora_B."""

    def __init__(self, lora_layer: nn.Module, logit: nn.Parameter):
        self.layer, self.logit, self.x = lora_layer, logit, None
        self.handles = [
            lora_layer.lora_A[_ADAPTER].register_forward_hook(self._stash),
            lora_layer.lora_B[_ADAPTER].register_forward_hook(self._mix),
        ]

    def _stash(self, module, args, output):
        self.x = args[0]

    def _mix(self, module, args, output):
        x, self.x = self.x, None
        ext_a, ext_b = getattr(self.layer, EXT_A), getattr(self.layer, EXT_B)
        external = nn.functional.linear(nn.functional.linear(x.to(ext_a.dtype), ext_a), ext_b)
        lam = torch.sigmoid(self.logit).to(output.dtype)
        return lam * output + (1 - lam) * external.to(output.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attach_mixing(model, layers: list[int], logit_init: float = 0.0) -> None:
    """Give every LoRA layer in the listed blocks a zero external branch and each block a theta.

    theta starts at `logit_init` (0 -> lambda = 0.5). Replaces any earlier attachment.
    """
    detach_mixing(model)
    blocks = _decoder_layers(model)
    by_block: dict[int, list[nn.Module]] = {}
    for name, layer in lora_layers(model).items():
        marker = ".layers."
        if marker in name:
            by_block.setdefault(int(name.split(marker, 1)[1].split(".", 1)[0]), []).append(layer)
    mixers = []
    for index in sorted(set(layers)):
        if not by_block.get(index):
            raise ValueError(f"block {index} has no LoRA layer to mix")
        block = blocks[index]
        device = next(block.parameters()).device
        logit = nn.Parameter(torch.full((), float(logit_init), device=device), requires_grad=False)
        block.register_parameter(MIX, logit)
        for layer in by_block[index]:
            a = layer.lora_A[_ADAPTER].weight
            b = layer.lora_B[_ADAPTER].weight
            layer.register_parameter(EXT_A, nn.Parameter(torch.zeros_like(a), requires_grad=False))
            layer.register_parameter(EXT_B, nn.Parameter(torch.zeros_like(b), requires_grad=False))
            mixers.append(_Mixer(layer, logit))
    model._fedlora_mixers = mixers
    model._fedlora_mixed_layers = sorted(set(layers))


def detach_mixing(model) -> None:
    """Remove hooks and the extra parameters; the model is plain PEFT again."""
    for mixer in getattr(model, "_fedlora_mixers", []):
        mixer.remove()
        for attr in (EXT_A, EXT_B):
            if attr in mixer.layer._parameters:
                del mixer.layer._parameters[attr]
    for block in _decoder_layers(model):
        if MIX in block._parameters:
            del block._parameters[MIX]
    model._fedlora_mixers = []
    model._fedlora_mixed_layers = []


def mixed_layers(model) -> list[int]:
    return list(getattr(model, "_fedlora_mixed_layers", []))
