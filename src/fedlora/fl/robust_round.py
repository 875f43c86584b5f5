"""Byzantine clients inside a round: who they are, what update attackers send, the robust rule.

Byzantine clients are fixed for the run by `choose_byzantine(num_clients, byzantine, seed)`.
- Label flipping: they train on their rows with reversed labels (`flip_labels_of`, a copy made at
  training time, so it also applies to rows a client rule supplies, e.g. Concordia's synthetic
  ones; the Federation is untouched) and otherwise follow the client protocol, worker momentum
  included.
- Update attacks (`AttackInjection`, combine stage 30): they do not train. Once the honest
  clients of the round have uploaded, each sampled Byzantine client sends download +
  attack(honest updates), updates being upload - download flattened by sorted name; with
  'malformed:<kind>' it sends `attacks.malformed(kind, download)`. Their payloads are decoded and
  validated by the server like any other (`ctx.receive`); a rejected one is listed and dropped.
- The robust rule (`RobustMean`, stage 40) replaces the method's weighted mean: the chain runs on
  the updates with uniform weights (example counts are a client's word, which a robust rule
  must not trust), the download is added back, and the method aggregates that one update.

f is the declared number of Byzantine clients and is never lowered by honest absence (dropout,
lateness, a failed client, a small sample). Only an upload the server rejected lowers it: a
correct client's upload always validates, so a rejected sender is one of the f faulty clients
and at most f - r remain among the accepted. When too few updates arrive for the chain to
tolerate that f (trimmed mean needs n > 2f, Krum n > 2f + 2, ...), the round is skipped and the
reason logged and recorded in the server row (`skip_reason`); it is never silently averaged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedlora.fl.aggregate import Chain, aggregate_tensors, build_chain
from fedlora.fl.attacks import attack as run_attack
from fedlora.fl.attacks import flip_labels, malformed
from fedlora.fl.combine import RoundContext, SkipRound, Transform, flat_deltas, unflatten_like
from fedlora.fl.methods import ClientUpdate
from fedlora.fl.payload import encode
from fedlora.train.batches import EncodedExamples

log = logging.getLogger("fedlora")


def flip_labels_of(data: EncodedExamples) -> EncodedExamples:
    """A copy of `data` with its labels reversed (c -> C-1-c)."""
    labels = flip_labels(np.asarray(data.labels), len(data.verbalizer_ids))
    return EncodedExamples(list(data.prompt_ids), labels, data.verbalizer_ids)


class RobustMean(Transform):
    """The robust chain in place of the method's weighted mean (config `robust.aggregator`, `robust.f`)."""

    name, stage = "aggregator", 40

    def __init__(self, spec, f: int, num_sampled: int):
        self.spec, self.f = spec, f
        self.chain: Chain = build_chain(spec, f)
        self.chain.validate(num_sampled)  # misuse fails before round 1, naming the rule and condition

    def chain_for(self, num_rejected: int) -> Chain:
        """The chain with f lowered only by the rejected senders (see the module docstring)."""
        f = max(0, self.f - num_rejected)
        return self.chain if f == self.f else build_chain(self.spec, f)

    def aggregate_fn(self, st, ctx: RoundContext):
        """`[n, d] -> [d]` as the server will aggregate (what a defence-aware attacker optimizes against)."""
        def agg(x: torch.Tensor) -> torch.Tensor:
            return self.chain(x, st, ctx.streams.torch("robust_chain", ctx.round_index))[0]
        return agg

    def apply(self, updates, st, ctx):
        chain = self.chain_for(ctx.num_rejected)
        ctx.notes["robust_f"] = chain.f
        try:
            chain.validate(len(updates)) if updates else None
        except ValueError as exc:
            raise SkipRound(f"{exc} (f={chain.f} is the declared robust.f less {ctx.num_rejected} rejected "
                            f"sender(s); honest absence does not lower it)") from None
        if not updates:
            return updates, st
        ref, keys, deltas = flat_deltas(ctx.method, updates, ctx, "a robust chain")
        if st is None:
            st = chain.init(sum(ref[k].numel() for k in keys))
        gen = ctx.streams.torch("robust_chain", ctx.round_index) if chain.needs_generator else None
        delta, st = aggregate_tensors(chain, deltas, weights=None, state=st, generator=gen)
        combined = ClientUpdate(-1, {k: ref[k] + delta[k] for k in keys}, sum(u.num_examples for u in updates))
        return [combined], st


class AttackInjection(Transform):
    """Simulated update attackers send from the round's honest updates (config `robust.attack`)."""

    name, stage = "", 30

    def __init__(self, attack: str, attack_args: dict, robust: RobustMean | None):
        self.attack, self.attack_args, self.robust = attack, dict(attack_args), robust
        self.malformed_kind = attack.split(":", 1)[1] if attack.startswith("malformed:") else None

    def apply(self, updates, st, ctx):
        if not ctx.attackers:
            return updates, st
        ref = ctx.reference(ctx.attackers[0])
        sent = self._payloads(ref, updates, ctx)
        for cid in ctx.attackers:
            row = {"client": cid, "bytes_down": len(encode(ref)) if ref else 0}
            update, row = ctx.receive(cid, sent[cid], ctx.declared_examples(cid), row)
            ctx.rows.append(row)
            if update is None:
                ctx.num_rejected += 1
            else:
                updates = [*updates, update]
        return updates, st

    def _payloads(self, ref, honest: list[ClientUpdate], ctx) -> dict[int, dict]:
        if self.malformed_kind is not None:
            return {cid: malformed(self.malformed_kind, ref) for cid in ctx.attackers}
        if not honest:
            log.warning("round %d: no honest update to attack from; Byzantine clients send the download",
                        ctx.round_index)
            return {cid: ref for cid in ctx.attackers}
        keys = sorted(ref)
        deltas = torch.stack([torch.cat([(u.tensors[k].to(torch.float32) - ref[k]).reshape(-1) for k in keys])
                              for u in honest])
        agg = (self.robust.aggregate_fn(ctx.states.get("aggregator"), ctx) if self.robust is not None
               else (lambda x: x.mean(dim=0)))
        with ctx.timer("attack"):
            byz = run_attack(self.attack, deltas, len(ctx.attackers), ctx.streams.torch("attack", ctx.round_index),
                             aggregate=agg, **self.attack_args)
        return {cid: {k: ref[k] + v for k, v in unflatten_like(row, ref, keys).items()}
                for row, cid in zip(byz, ctx.attackers)}
