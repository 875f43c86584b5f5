"""Byzantine clients and robust aggregation inside the simulator (config `robust`).

Byzantine robustness (config `robust`, docs/robustness.md): Byzantine clients are fixed for the
run by `choose_byzantine(num_clients, byzantine, seed)`. With label flipping they train on their
rows with reversed labels (a copy of their training set; the Federation is untouched). With an
update attack they do not train: once the honest clients of the round have uploaded, each sampled
Byzantine client sends download + attack(honest updates), updates being upload - download,
flattened by sorted name as `aggregate_tensors` does; with 'malformed:<kind>' it sends
`attacks.malformed(kind, download)`. Every upload is decoded and validated as a server would; a
payload that fails (`PayloadError`) is rejected, logged and listed in the server row, and the
round goes on with the others (no update left: the server state is unchanged). A robust chain
replaces the method's weighted mean: the server aggregates the updates with the chain, adds the
download back, and hands the method that one update (summed example count), whose weighted mean
is itself. Honest clients with worker momentum upload started + m_t (see RobustConfig.momentum).
Pooled methods (centralized) are a reference and ignore the `robust` section.

Differential privacy (config `dp`, `fl/dp.py`) takes the same path: `_aggregate` hands the updates
to `DPRound._dp_aggregate` (clipped, summed, noised, divided by m) in place of the method's mean.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedlora.fl.aggregate import Chain, aggregate_tensors, build_chain
from fedlora.fl.attacks import attack as run_attack
from fedlora.fl.attacks import choose_byzantine, flip_labels, malformed
from fedlora.fl.dp import DPRound
from fedlora.fl.methods import ClientUpdate
from fedlora.fl.momentum import momentum_init, momentum_update
from fedlora.fl.payload import encode, spec_of
from fedlora.train.batches import EncodedExamples

if TYPE_CHECKING:
    from fedlora.fl.engine import RunState, _Timer

log = logging.getLogger("fedlora")


class RobustRound(DPRound):
    """Mixin of `Simulator`: uses its `cfg`, `method`, `seed`, `train_sets`, `num_sampled`, `receive`."""

    def _setup_robust(self) -> None:
        """Byzantine ids, flipped training sets, the robust chain and the DP settings; misuse fails
        here, before a round."""
        self._setup_dp()
        rb, method = self.cfg.robust, self.method
        self.robust_on = not method.pooled and (
            rb.aggregator is not None or rb.byzantine > 0 or rb.momentum is not None)
        self.byzantine: list[int] = []
        self.chain: Chain | None = None
        self.malformed_kind: str | None = None
        if not self.robust_on:
            return
        self.byzantine = choose_byzantine(len(self.train_sets), rb.byzantine, self.seed)
        update_attack = rb.attack != "none" and rb.byzantine > 0
        if rb.attack.startswith("malformed:"):
            self.malformed_kind = rb.attack.split(":", 1)[1]
        needs_mean = [name for name, on in (("robust.aggregator", rb.aggregator is not None),
                                            (f"robust.attack={rb.attack}", update_attack),
                                            ("robust.momentum", rb.momentum is not None)) if on]
        if needs_mean and not method.mean_aggregation:
            raise ValueError(
                f"method {method.name!r} does not aggregate by a weighted mean of the uploads, so "
                f"{', '.join(needs_mean)} cannot apply to it (supported: fedit, fedprox, ffa, fedsa, "
                "fedavgm, fedadagrad, fedadam, fedyogi)")
        if rb.aggregator is not None:
            self.chain = build_chain(rb.aggregator, rb.f)
            self.chain.validate(self.num_sampled)
        if rb.label_flip:
            self.train_sets = list(self.train_sets)
            for cid in self.byzantine:
                data = self.train_sets[cid]
                labels = flip_labels(np.asarray(data.labels), len(data.verbalizer_ids))
                self.train_sets[cid] = EncodedExamples(list(data.prompt_ids), labels, data.verbalizer_ids)

    def _attacker(self, cid: int) -> bool:
        """A Byzantine client that sends an attack instead of what it trained (it does not train)."""
        return cid in self.byzantine and self.cfg.robust.attack != "none"

    def _with_momentum(self, state: RunState, cid: int, payload: dict, start: dict, beta: float) -> dict:
        """started + m_t, with m_t the client's momentum of g_t = trained - started (RobustConfig.momentum)."""
        started = {k: start[k].detach().to("cpu", torch.float32) for k in payload}
        g = {k: payload[k] - started[k] for k in payload}
        if state.momentum is None:
            state.momentum = [None] * len(self.train_sets)
        mstate = state.momentum[cid] if state.momentum[cid] is not None else momentum_init(g)
        sent, state.momentum[cid] = momentum_update(mstate, g, beta)
        return {k: started[k] + sent[k] for k in payload}

    def _reference(self, server: dict, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` starts from (the download; the same for every client of a mean method)."""
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.method.download(server, cid).items()}

    def _generator(self, round_index: int, salt: int) -> torch.Generator:
        seed = int(np.random.default_rng([self.seed, round_index, 10**6 + salt]).integers(2**62))
        return torch.Generator().manual_seed(seed)

    def _chain_fn(self, state: RunState, round_index: int):
        """The server's aggregation as `[n, d] -> [d]` (for defence-aware attacks): the chain, or the mean."""
        if self.chain is None:
            return lambda x: x.mean(dim=0)
        chain, chain_state = self.chain, state.aggregator

        def agg(x: torch.Tensor) -> torch.Tensor:
            return chain(x, chain_state, self._generator(round_index, 2))[0]

        return agg

    def _attack_round(self, state: RunState, attackers: list[int], honest: list[ClientUpdate],
                      round_index: int, timer: _Timer) -> tuple[list[ClientUpdate | None], list[dict]]:
        """What the sampled Byzantine clients send this round, decoded by the server like any upload."""
        rb = self.cfg.robust
        ref = self._reference(state.server, attackers[0])
        expected = spec_of(ref)
        n_examples = {cid: len(self.train_sets[cid]) for cid in attackers}
        if self.malformed_kind is not None:
            sent = {cid: malformed(self.malformed_kind, ref) for cid in attackers}
        elif not honest:
            log.warning("round %d: no honest update to attack from; Byzantine clients send the download", round_index)
            sent = {cid: ref for cid in attackers}
        else:
            keys = sorted(ref)
            deltas = torch.stack([torch.cat([(u.tensors[k].to(torch.float32) - ref[k]).reshape(-1) for k in keys])
                                  for u in honest])
            with timer("attack"):
                byz = run_attack(rb.attack, deltas, len(attackers), self._generator(round_index, 1),
                                 aggregate=self._chain_fn(state, round_index), **rb.attack_args)
            sent = {}
            for row_vec, cid in zip(byz, attackers):
                out, start = {}, 0
                for k in keys:
                    size = ref[k].numel()
                    out[k] = ref[k] + row_vec[start:start + size].reshape(ref[k].shape)
                    start += size
                sent[cid] = out
        updates, rows = [], []
        for cid in attackers:
            row = {"client": cid, "bytes_down": len(encode(ref)) if ref else 0}
            update, row = self.receive(cid, sent[cid], n_examples[cid], row, timer, expected=expected,
                                       round_index=round_index)
            updates.append(update)
            rows.append(row)
        return updates, rows

    def _deltas(self, state: RunState, updates: list[ClientUpdate], who: str
                ) -> tuple[dict[str, torch.Tensor], list[str], list[dict[str, torch.Tensor]]]:
        """(download, its sorted names, upload - download per update), all float32."""
        ref = self._reference(state.server, updates[0].client_id)
        keys = sorted(ref)
        if any(sorted(u.tensors) != keys for u in updates):
            raise ValueError(f"method {self.method.name!r}: uploads do not carry the downloaded tensors; "
                             f"{who} cannot aggregate them")
        return ref, keys, [{k: u.tensors[k].to(torch.float32) - ref[k] for k in keys} for u in updates]

    def _aggregate(self, state: RunState, updates: list[ClientUpdate], round_index: int) -> dict:
        """The method's aggregation, with DP-FedAvg or the robust chain in place of its weighted mean
        when set."""
        if self.dp is not None:
            return self._dp_aggregate(state, updates, round_index)
        if self.chain is None:
            return self.method.aggregate(state.server, updates)
        ref, keys, deltas = self._deltas(state, updates, "a robust chain")
        chain = self.chain
        dropped = self.num_sampled - len(updates)
        if dropped > 0 and chain.f > 0:
            # Rejected uploads count against f (they were Byzantine): n - r > 2(f - r) still holds.
            chain = build_chain(self.cfg.robust.aggregator, max(0, chain.f - dropped))
        weights = None
        if chain.links[-1].name == "mean":
            rows = len(updates)
            for link in chain.links[:-1]:
                rows = link.rows_out(rows)
            if rows == len(updates):  # plain FedAvg weights when no pre-aggregator changes the rows
                weights = [float(u.num_examples) for u in updates]
        if state.aggregator is None:
            state.aggregator = chain.init(sum(ref[k].numel() for k in keys))
        gen = self._generator(round_index, 2) if chain.needs_generator else None
        delta, state.aggregator = aggregate_tensors(chain, deltas, weights=weights, state=state.aggregator,
                                                    generator=gen)
        combined = ClientUpdate(-1, {k: ref[k] + delta[k] for k in keys}, sum(u.num_examples for u in updates))
        return self.method.aggregate(state.server, [combined])
