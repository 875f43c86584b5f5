"""Concordia: federated LoRA on synthetic tables only (Huang et al., arXiv 2605.09855).

Three levels per client k, one round t (config `concordia`; the paper's body is not public, so
the parts marked (ours) follow the reconstructed design in docs/concordia.md):

3. Table generator G_k: the shared base model with the client's own generator LoRA, fine-tuned
   once on its real training rows in GReaT form (`synth/great.py`, `synth/generator.py`). It never
   leaves the client. Each round it samples `synthetic_rows` rows (strictly parsed; the validity
   rate is logged) and, every `refine_every` rounds, is refined with GRPO (`synth/grpo.py`),
   rewarded by the ensemble of shared scorers + a validity term - a near-copy penalty (ours: the
   ensemble is the scorers the server sent this round with the client's own freshest one in place
   of its old copy).
2. Utility scorer phi_k (`synth/scorer.py`): a small MLP on the row's schema features, refitted
   each round to first-order influence targets u(s) = <grad l(theta_k; s), grad L_val,k(theta_k)>
   on the client's private validation rows, with theta_k the task LoRA it just trained.
1. Task LoRA: trained by the configured server method (`fl.method`, FedIT by default) on the
   synthetic rows only, each row weighted by softmax_tau(phi_k(s)) (mean 1; uniform in round 1,
   before any scorer exists).

Concordia is a client rule (`fl/rules.py`), not an engine: `concordia_simulator` is the server
simulator with this rule, so sampling, faults, attacks and robust chains compose as for any run.
Sent up: the server method's payload for the task LoRA, plus phi_k's tensors in the declared side
channel `scorer` (`scorer.*`, schema in `fl/schema.py`). Sent down: the server method's download,
plus every client's latest scorer (`ensemble.<j>.*`). Combined: the task LoRA by the server
method (robust chains apply as usual); the scorers are only collected (combine stage 'side') and
redistributed. DP does not clip or noise the scorers, so dp.enabled with a variant that shares
them is refused before round 1 (fl/combine.py); 'decoupled', 'static' and 'local' share none. Real rows, validation rows and generator weights never
leave the client (`tests/test_concordia.py` audits every payload).

Baselines on the same partitions and budget (`concordia.variant`): 'static' (rows generated once,
no reweighting, no refinement), 'decoupled' (fresh rows every round from the generator fitted for
fidelity only, i.e. GReaT's likelihood on real rows, never tuned toward the task; no scorer),
'uniform' (no reweighting), 'local' (GRPO rewarded by the client's own scorer; scorers are not
shared). Real-data FedIT is the same config with Concordia off.

Per client and round the training row also carries the synthetic table's quality (`syn_*`: TSTR
vs TRTR, column fidelity, correlation gap, distance to closest record, closer-to-train share,
membership-inference AUC; `synth/quality.py`), written to `quality.jsonl` and `quality.png`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedlora.config import ConfigError
from fedlora.data.text import RowSerializer
from fedlora.fl.engine import RunResult, RunState, Simulator
from fedlora.fl.methods import Method, available_methods, method_class
from fedlora.fl.rules import ClientRule
from fedlora.fl.schema import SideChannel
from fedlora.fl.timer import Timer
from fedlora.jsonio import jsonl_lines
from fedlora.model.lora import adapter_parameters
from fedlora.synth.features import RowFeaturizer, encode_rows
from fedlora.synth.generator import GeneratorConfig, RewardComposer, RewardConfig, TableGenerator
from fedlora.synth.great import GreatCodec
from fedlora.synth.grpo import GRPOConfig, refine
from fedlora.synth.quality import table_quality
from fedlora.synth.scorer import ScorerConfig, UtilityScorer, ensemble_utility, fit_client_scorer, sample_weights

log = logging.getLogger("fedlora")

SCORER, ENSEMBLE = "scorer.", "ensemble."
_FITTED = "_fedlora_fitted_generators"
"""Model attribute: its fitted generators by (seed, client, config, rows); see initial_state."""

_VARIANTS = {  # regenerate each round, reweight, fit a scorer ('local' does not share it), GRPO
    "concordia": (True, True, True, True),
    "uniform": (True, False, True, True),
    "local": (True, True, True, True),
    "decoupled": (True, False, False, False),
    "static": (False, False, False, False),
}


@dataclass
class _Private:
    """What only client k holds: its codec, serializer, real rows and validation encodings."""

    codec: GreatCodec
    serializer: RowSerializer
    train: pd.DataFrame
    holdout: pd.DataFrame
    test: pd.DataFrame


def concordia_simulator(fed, method, seed=None, **kwargs) -> Simulator:
    """The server simulator with Concordia's client rule; any server method federates the task LoRA."""
    return Simulator(fed, method, seed=seed, rule=ConcordiaRule(fed), **kwargs)


ConcordiaSimulator = concordia_simulator  # the name earlier code and tests use


class ConcordiaRule(ClientRule):
    """Concordia's client step (levels 1-3 above) and its scorer side channel."""

    name = "concordia"
    state_field = "synthetic"

    def __init__(self, fed):
        cc = fed.cfg.concordia
        self.fed, self.cfg = fed, fed.cfg
        self.regenerate, self.reweight, self.scores, self.refine = _VARIANTS[cc.variant]
        self.shares = self.scores and cc.variant != "local"
        self.gen_cfg = GeneratorConfig(**cc.generator)
        self.grpo_cfg = GRPOConfig(**cc.grpo)
        self.scorer_cfg = ScorerConfig(**cc.scorer)
        self.reward_cfg = RewardConfig(**cc.reward)
        self.featurizer = RowFeaturizer(fed.table)
        self.private = [self._private(cid) for cid in range(fed.num_clients)]
        self.weights: list[np.ndarray | None] = [None] * fed.num_clients
        spec = {k: (tuple(v.shape), v.dtype) for k, v in
                UtilityScorer(self.featurizer.dim, self.scorer_cfg.hidden).to_tensors().items()}
        self.side_channels = (SideChannel("scorer", SCORER, spec),) if self.shares else ()

    def check(self, method: Method) -> None:
        _check_server_method(method)

    def _private(self, cid: int) -> _Private:
        table, rows = self.fed.table, self.fed.clients[cid].rows
        train = table.frame.iloc[rows["train"]].reset_index(drop=True)
        holdout = table.frame.iloc[np.concatenate([rows["val"], rows["test"]])].reset_index(drop=True)
        codec = GreatCodec(table, train, self.gen_cfg.digits, self.gen_cfg.range_margin, self.gen_cfg.start)
        serializer = RowSerializer(table, self.cfg.data).fit(train)  # as federation.prepare does
        return _Private(codec, serializer, train, holdout, table.frame.iloc[rows["test"]].reset_index(drop=True))

    def _rng(self, name: str, round_index: int, cid: int) -> np.random.Generator:
        return self.sim.streams.numpy(f"concordia.{name}", round_index, cid)

    # --- state -------------------------------------------------------------------------------
    def initial_state(self, state: RunState) -> None:
        """Each client's generator fitted on its real rows, beside the server method's state."""
        generators, limits = [], []
        fitted = getattr(self.fed.model, _FITTED, None)
        if fitted is None:  # kept on the model: it lives and dies with the weights the fits used
            fitted = {}
            setattr(self.fed.model, _FITTED, fitted)
        seed = self.sim.seed
        for cid, own in enumerate(self.private):
            # The fit depends only on (model, seed, client rows, generator config): the variants
            # of one `fedlora concordia` seed reuse it instead of fitting the same generator again.
            key = (seed, cid, repr(self.gen_cfg), pd.util.hash_pandas_object(own.train, index=False).sum())
            if key not in fitted:
                gen = TableGenerator(self.fed.table, self.gen_cfg)
                gen.fit(self.fed.model, self.fed.tokenizer, own.train, self.gen_cfg, self._rng("fit", 0, cid))
                if len(fitted) >= 64:
                    fitted.clear()
                fitted[key] = ({k: v.clone() for k, v in gen.state_dict().items()}, gen.max_new_tokens)
            tensors, limit = fitted[key]
            generators.append({k: v.clone() for k, v in tensors.items()})
            limits.append(limit)
        n = self.fed.num_clients
        state.synthetic = {"generator": generators, "max_new_tokens": limits, "scorer": [None] * n,
                           "rows": [None] * n, "ensemble": {}}

    def _table_generator(self, state: RunState, cid: int) -> TableGenerator:
        gen = TableGenerator(self.fed.table, self.gen_cfg)
        gen.load_state_dict(state.synthetic["generator"][cid], codec=self.private[cid].codec)
        gen.max_new_tokens = state.synthetic["max_new_tokens"][cid]
        return gen

    # --- one client's round ------------------------------------------------------------------
    def client_round(self, state: RunState, cid: int, round_index: int, received: dict, timer: Timer):
        sim = self.sim
        task = {k: v for k, v in received.items() if not k.startswith(ENSEMBLE)}
        frame, row = self._synthesize(state, cid, round_index, timer)
        own = self.private[cid]
        sim.train_sets[cid] = encode_rows(self.fed.tokenizer, own.serializer, self.fed.table, frame,
                                          self.cfg.data.max_length)
        features = self.featurizer.transform(frame)
        scorer = _scorer(state.synthetic["scorer"][cid])
        self.weights[cid] = (sample_weights(scorer.score(features), self.scorer_cfg.temperature,
                                            self.scorer_cfg.weight_mode, floor=self.scorer_cfg.weight_floor)
                             if self.reweight and scorer is not None else None)
        payload, train_row = sim.local_round(state, cid, round_index, task, timer)
        row.update(train_row)
        if self.scores:  # level 2, on the task LoRA this client just trained
            with timer("scorer"):
                fit = fit_client_scorer(self.fed.model, list(adapter_parameters(self.fed.model).values()),
                                        sim.train_sets[cid], features, self.fed.clients[cid].val, self.fed.pad_id,
                                        self.scorer_cfg, scorer=scorer, rng=self._rng("score", round_index, cid))
            state.synthetic["scorer"][cid] = fit.scorer.to_tensors()
            row["scorer_loss"] = float(fit.loss)
            if self.shares:
                payload = {**payload, **{SCORER + k: v for k, v in fit.scorer.to_tensors().items()}}
        if self.refine and round_index % self.cfg.concordia.refine_every == 0:
            with timer("refine"):
                row.update(self._refine(state, cid, round_index, received, scorer=_scorer(
                    state.synthetic["scorer"][cid])))
        return payload, row

    def sample_weights(self, cid: int) -> np.ndarray | None:
        return self.weights[cid]

    def _synthesize(self, state: RunState, cid: int, r: int, timer: Timer) -> tuple[pd.DataFrame, dict]:
        """This round's synthetic rows (or the static variant's rows from its first round)."""
        own, kept = self.private[cid], state.synthetic["rows"][cid]
        if not self.regenerate and kept is not None:
            return pd.DataFrame(kept, columns=self.fed.table.frame.columns), {"syn_rows": len(kept)}
        with timer("generate"):
            sample = self._table_generator(state, cid).sample(self.fed.model, self.fed.tokenizer,
                                                              self.cfg.concordia.synthetic_rows,
                                                              self._rng("sample", r, cid))
        if len(sample.frame) == 0:
            reasons = dict(Counter(x for x in sample.reasons if x is not None))
            raise ValueError(f"client {cid}'s generator wrote no valid row out of {len(sample.texts)} "
                             f"(reasons: {reasons}); fit it longer (concordia.generator.steps)")
        row = {"syn_rows": len(sample.frame), "syn_validity": sample.validity_rate}
        every = self.cfg.concordia.quality_every
        if every and r % every == 0:
            with timer("quality"):
                quality = table_quality(sample.frame, own.train, own.holdout, own.test, self.fed.table,
                                        seed=self.sim.seed)
            row.update({f"syn_{k}": v for k, v in quality.items() if k != "rows"})
        if not self.regenerate:
            state.synthetic["rows"][cid] = json.loads(sample.frame.to_json(orient="records"))
        return sample.frame, row

    def _refine(self, state: RunState, cid: int, r: int, received: dict, scorer: UtilityScorer | None) -> dict:
        """Level 3: GRPO on the generator, rewarded by the ensemble (or, 'local', its own scorer)."""
        scorers = _ensemble_from(received) if self.shares else {}
        if scorer is not None:
            scorers[cid] = scorer  # its own freshest scorer in place of the copy the server holds

        def utility(frame: pd.DataFrame) -> np.ndarray:
            if not scorers:
                return np.zeros(len(frame))
            return ensemble_utility(list(scorers.values()), self.featurizer.transform(frame))

        gen = self._table_generator(state, cid)
        reward = RewardComposer(gen.codec, self.private[cid].train, utility, self.reward_cfg)
        stats = refine(gen, self.fed.model, self.fed.tokenizer, reward, self.grpo_cfg, self._rng("refine", r, cid))
        state.synthetic["generator"][cid] = gen.state_dict()
        last = stats[-1]
        return {"grpo_reward": last.reward_mean, "grpo_reward_std": last.reward_std, "grpo_kl": last.kl,
                "grpo_validity": last.validity}

    # --- server side of the side channel -----------------------------------------------------
    def download_extra(self, state: RunState) -> dict[str, torch.Tensor]:
        if not self.shares:
            return {}
        return {f"{ENSEMBLE}{j}.{k}": v for j, tensors in sorted(state.synthetic["ensemble"].items())
                for k, v in tensors.items()}

    def absorb(self, st: dict, channel: SideChannel, cid: int, tensors: dict) -> dict:
        """The sender's scorer joins the ensemble as is (a copy of the rule state; committed with the round)."""
        return {**st, "ensemble": {**st["ensemble"], str(cid): tensors}}

    # --- outputs -----------------------------------------------------------------------------
    def save_extras(self, result: RunResult, folder: Path) -> list[Path]:
        """quality.jsonl (one row per client and round) and quality.png."""
        from fedlora.synth.quality_plots import plot_quality

        rows = [{"client": r["client"], "round": r["round"], **{k[4:]: v for k, v in r.items() if k.startswith("syn_")}}
                for r in result.rows if isinstance(r.get("client"), int) and "syn_rows" in r]
        path = folder / "quality.jsonl"
        path.write_text(jsonl_lines(rows), encoding="utf-8")  # strict JSON: NaN is null
        out = [path]
        if any("fidelity_mean" in r for r in rows):
            out.append(plot_quality([r for r in rows if "fidelity_mean" in r], folder / "quality.png"))
        return out


def _moves_base_or_layout(method: type[Method] | Method) -> bool:
    return any(method.overrides(h) for h in ("base_delta", "mixing_layers"))


def _can_carry(method: type[Method] | Method) -> bool:
    """The generator shares the task LoRA's adapter slot and the frozen base: a method that changes
    the base (FLoRA), attaches mixing layers (FedTreeLoRA) or gossips cannot federate it (yet)."""
    return not (_moves_base_or_layout(method) or method.decentralized or method.pooled)


def _check_server_method(method: Method) -> None:
    if not _can_carry(method):
        hooks = _moves_base_or_layout(method)
        able = [n for n in available_methods() if _can_carry(method_class(n))]
        raise ConfigError(f"concordia cannot federate the task LoRA with {method.name!r} (it "
                          f"{'changes the base or the adapter layout' if hooks else 'is not a server method'}); "
                          f"use one of {', '.join(able)}")


def _scorer(tensors: dict | None) -> UtilityScorer | None:
    return None if tensors is None else UtilityScorer.from_tensors(tensors)


def _ensemble_from(received: dict) -> dict[int, UtilityScorer]:
    """The scorers a download carries, by client id."""
    by_client: dict[int, dict] = {}
    for key, value in received.items():
        if key.startswith(ENSEMBLE):
            cid, name = key[len(ENSEMBLE):].split(".", 1)
            by_client.setdefault(int(cid), {})[name] = value
    return {cid: UtilityScorer.from_tensors(t) for cid, t in sorted(by_client.items())}
