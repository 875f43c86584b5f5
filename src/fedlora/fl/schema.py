"""What a client may send, declared once: tensor names, shapes and dtypes, side channels, and the
bounds of its metadata. The simulator, gossip and the Flower server validate with the same schema.

    schema = upload_schema(method, initial_adapter, cid, side_channels=rule.side_channels)
    update = schema.receive(blob, round_index=r, sender=cid, max_examples=cap)   # or PayloadError

The schema also bounds what a sender can make the receiver parse: a payload over `max_bytes` (the
tensors' bytes plus a small header allowance, fl/payload.py `payload_cap`) is refused on its length,
and one whose header declares other tensors is refused before any tensor is read.

- Tensors: the method's upload for an adapter of the model's shape (`method.upload` of the
  initial adapter), so a sender can never add, drop or reshape a tensor.
- Side channels: named groups of extra tensors (Concordia's utility scorer, `scorer.*`), each
  with its own spec and whether DP covers it (`dp_covered`). DP refuses a run whose payload
  carries a channel it does not cover (fl/combine.py).
- `num_examples`: an integer in [1, max_examples]. A server knows nothing else of a client's data
  size, so an unbounded count would let one client own a weighted mean; the cap defaults to the
  client's declared data size in simulation and to `fl.max_examples` in deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from fedlora.fl.methods import ClientUpdate, Method
from fedlora.fl.payload import PayloadError, decode, payload_cap, spec_of
from fedlora.model.lora import zero_pad_rank

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class SideChannel:
    """Extra tensors a client sends beside the method's payload, under `prefix`."""

    name: str
    prefix: str
    spec: Spec = field(default_factory=dict)
    """Names (without the prefix) -> (shape, dtype)."""
    dp_covered: bool = False
    """Whether the run's DP mechanism clips and noises this channel (no channel so far is)."""

    def split(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """(tensors outside the channel, the channel's tensors without the prefix)."""
        inside = {k[len(self.prefix):]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        return {k: v for k, v in tensors.items() if not k.startswith(self.prefix)}, inside


def check_count(value: object, max_examples: int) -> int:
    """The metadata's example count, an int in [1, max_examples], or PayloadError('examples')."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_examples:
        raise PayloadError(f"payload metadata 'num_examples' must be an integer in [1, {max_examples}] "
                           f"(the sender's declared data size in simulation, fl.max_examples in deployment), "
                           f"received {value!r:.40}", "examples")
    return value


@dataclass(frozen=True)
class PayloadSchema:
    tensors: Spec
    side_channels: tuple[SideChannel, ...] = ()
    """A payload may omit a side channel (e.g. before its first scorer exists, or an attacker's)."""

    def expected(self, names: Iterable[str]) -> Spec:
        """The spec a payload declaring tensors `names` must match: the method's tensors plus every
        channel it carries."""
        names = list(names)
        out = dict(self.tensors)
        for channel in self.side_channels:
            if any(k.startswith(channel.prefix) for k in names):
                out.update({channel.prefix + k: v for k, v in channel.spec.items()})
        return out

    @cached_property
    def max_bytes(self) -> int:
        """The size cap: every tensor this schema allows (all side channels present), plus header room."""
        every = dict(self.tensors)
        for channel in self.side_channels:
            every.update({channel.prefix + k: v for k, v in channel.spec.items()})
        return payload_cap(every)

    def decode(self, blob: bytes, *, round_index: int | None, sender: int | None,
               max_examples: int) -> tuple[dict[str, torch.Tensor], int]:
        """(tensors, example count) of a valid payload; PayloadError naming the problem otherwise."""
        tensors, meta = decode(blob, expected=self.expected, max_bytes=self.max_bytes, expected_round=round_index,
                               expected_sender=sender, require_meta=("num_examples",))
        return tensors, check_count(meta["num_examples"], max_examples)

    def receive(self, blob: bytes, *, round_index: int | None, sender: int,
                max_examples: int) -> ClientUpdate:
        tensors, count = self.decode(blob, round_index=round_index, sender=sender, max_examples=max_examples)
        return ClientUpdate(sender, tensors, count)


def upload_schema(method: Method, initial: Mapping[str, torch.Tensor], cid: int,
                  side_channels: tuple[SideChannel, ...] = ()) -> PayloadSchema:
    """The schema of client `cid`'s upload: the method's payload for an adapter of the model's shape."""
    init = {k: v.detach().to("cpu", torch.float32) for k, v in initial.items()}
    client = method.init_client(cid, dict(init))  # validates the method's per-client options first
    rank = method.client_rank(cid)  # FLoRA's heterogeneous ranks: the client's own rank-r_i shapes
    start = init if rank is None else zero_pad_rank(init, rank)
    payload, _ = method.upload(dict(start), client)
    return PayloadSchema(spec_of(payload), tuple(side_channels))
