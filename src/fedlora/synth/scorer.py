"""Concordia level 2: a per-client utility scorer that re-weights synthetic rows (arXiv 2605.09855).

Each client k owns a small MLP phi_k on a row's schema feature vector (`synth/features.py`,
`RowFeaturizer`). It is trained to predict the first-order influence u(s) of a synthetic row s on the
client's private validation loss (`synth/influence.py`, `influence_targets`); u(s) > 0 means a
gradient step on s lowers that loss, to first order. The scorer then gives level 1 its per-sample
weights (`sample_weights`) and, shared with the other clients, level 3 its GRPO reward
(`ensemble_utility`). `fit_client_scorer` does one client's refresh: influence on a random subset
of its synthetic rows, then a (warm-started) fit of phi_k.

What is trained here: only phi_k (a few KB). What travels: only `UtilityScorer.to_tensors()`, a flat
dict of float32 tensors that goes through `fl/payload.py` like an adapter; validation rows, their
gradients and the influence targets never leave the client.

The paper's body is not available (research note, section 3, marked [A]): the influence target,
the MLP on schema features, softmax/clip weights, z-normalised ensembling and every default below
are our (D) design choices, each documented where it is made.

>>> scorer = UtilityScorer(dim=2, hidden=4, seed=0)
>>> scorer.score(np.zeros((3, 2), dtype=np.float32)).shape
(3,)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.synth.influence import INFLUENCE_METHODS, influence_targets
from fedlora.train.batches import EncodedExamples

WEIGHT_MODES = ("softmax", "clip")


@dataclass
class ScorerConfig:
    """Level-2 tunables (to be embedded in the run config as `concordia.scorer` or similar)."""

    hidden: int = 32
    """MLP width: dim -> hidden -> 1. 32 keeps the payload near 8 KB for ~60 features."""
    epochs: int = 200
    """Full-batch AdamW steps per refresh; the targets are a few hundred rows at most."""
    lr: float = 1e-2
    weight_decay: float = 1e-4
    rank_weight: float = 0.0
    """Weight of the pairwise logistic ranking loss added to the MSE (0: MSE only). Weights and
    rewards only use the order and spread of scores, so ranking is a reasonable alternative."""
    subset: int = 64
    """Synthetic rows whose influence is computed per refresh (cost: 2 forward passes each)."""
    batch_size: int = 16
    """Rows per forward/backward pass when computing influence."""
    influence: str = "fd"
    """'fd' (central finite difference along the validation gradient) or 'exact' (a backward per
    example, the reference). Measured on the tiny model on one CPU thread, 'fd' is 1.4-4x faster
    (less with long prompts, where compute dominates); on a GPU, batch-1 passes are latency-bound,
    so the gain should approach the batch size (not measured)."""
    fd_step: float | None = None
    """Parameter-space length of the FD step; None: 1e-2, or 3e-2 when the model holds 16-bit weights."""
    temperature: float = 1.0
    """Softmax temperature in units of the set's score standard deviation (see sample_weights)."""
    weight_mode: str = "softmax"
    weight_floor: float = 0.01
    """Mix of uniform weight in every sample weight: keeps each weight > 0, so no training batch of
    `local_train` (which divides by the batch's weight sum) can have a zero total."""
    seed: int = 0
    """Initialisation seed of a fresh scorer."""

    def __post_init__(self):
        checks = [
            (self.hidden >= 1 and self.epochs >= 1, "hidden and epochs must be >= 1"),
            (self.lr > 0 and self.weight_decay >= 0 and self.rank_weight >= 0,
             "lr must be > 0, weight_decay and rank_weight >= 0"),
            (self.subset >= 2 and self.batch_size >= 1, "subset must be >= 2 and batch_size >= 1"),
            (self.influence in INFLUENCE_METHODS, f"influence must be one of {INFLUENCE_METHODS}"),
            (self.fd_step is None or self.fd_step > 0, "fd_step must be > 0 (or None for the default)"),
            (self.temperature > 0, "temperature must be > 0 (.inf for uniform weights)"),
            (self.weight_mode in WEIGHT_MODES, f"weight_mode must be one of {WEIGHT_MODES}"),
            (0 <= self.weight_floor <= 1, "weight_floor must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ScorerConfig: {message}")



# ------------------------------------------------------------------------------------- scorer


class UtilityScorer(torch.nn.Module):
    """phi(x) = mean_y + std_y * (w2 . gelu(W1 x + b1) + b2): dim -> hidden -> 1, on CPU, fp32.

    Trained on z-scored targets; `y_mean` / `y_std` are buffers, so `score` returns predictions on
    the original influence scale (the sign matters: 'clip' weights keep only u > 0). A refresh
    (`fit` again) warm-starts from the current weights and re-estimates the target scale.
    Parameters: hidden * (dim + 2) + 1, plus 4 numbers of scale and shape (~8 KB for dim 62).
    """

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"UtilityScorer needs dim >= 1 and hidden >= 1, got {dim}, {hidden}")
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)
        self.register_buffer("y_mean", torch.zeros(1))
        self.register_buffer("y_std", torch.ones(1))
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():  # torch's default bounds, from our generator (not the global RNG)
            for layer in (self.fc1, self.fc2):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)

    @property
    def dim(self) -> int:
        return self.fc1.in_features

    @property
    def hidden(self) -> int:
        return self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised prediction, shape (n,)."""
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))).squeeze(-1)

    def _inputs(self, X) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"features of shape {X.shape}, the scorer expects (n, {self.dim}); build "
                             "them with the same RowFeaturizer (same table schema) the scorer was made for")
        if len(X) == 0:
            raise ValueError("no rows to score; pass at least one row")
        if not np.isfinite(X).all():
            raise ValueError("features contain NaN or Inf; RowFeaturizer.transform never does")
        return torch.from_numpy(X)

    @torch.no_grad()
    def score(self, X) -> np.ndarray:
        """Predicted utility of each row (original influence scale), float64 (n,)."""
        return (self(self._inputs(X)) * self.y_std + self.y_mean).double().numpy()

    def fit(self, X, y, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-4,
            seed: int = 0, rank_weight: float = 0.0) -> float:
        """Full-batch AdamW on MSE(phi(X), z(y)) [+ rank_weight * pairwise logistic loss]; final loss.

        The ranking term is mean softplus(-(f_i - f_j)) over random pairs with y_i > y_j (8n pairs
        per step, drawn from a generator seeded with `seed`).
        """
        x = self._inputs(X)
        y = np.asarray(y, dtype=np.float64)
        if epochs < 1 or not lr > 0:
            raise ValueError(f"fit needs epochs >= 1 and lr > 0, got {epochs}, {lr}")
        if y.shape != (len(x),) or len(x) < 2 or not np.isfinite(y).all():
            raise ValueError(f"fit needs >= 2 rows and one finite target per row; got X with {len(x)} "
                             f"rows and y of shape {y.shape}")
        mean, std = float(y.mean()), float(y.std())
        std = std if std > 1e-12 * max(1.0, abs(mean)) else 1.0
        self.y_mean.fill_(mean)
        self.y_std.fill_(std)
        z = torch.from_numpy((y - mean) / std).float()
        gen = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            pred = self(x)
            loss = torch.mean((pred - z) ** 2)
            if rank_weight > 0:
                i, j = torch.randint(len(x), (2, 8 * len(x)), generator=gen)
                sign = torch.sign(z[i] - z[j])
                keep = sign != 0
                if keep.any():
                    margin = sign[keep] * (pred[i[keep]] - pred[j[keep]])
                    loss = loss + rank_weight * torch.nn.functional.softplus(-margin).mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that travels: flat float32 CPU tensors, including `dims` = [dim, hidden]."""
        out = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.state_dict().items()}
        out["dims"] = torch.tensor([self.dim, self.hidden], dtype=torch.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], dim: int | None = None) -> UtilityScorer:
        """Rebuild a received scorer, validating keys, dtypes, shapes and values (ValueError).

        `dim`, when given, is the receiver's feature dimension the scorer must accept.
        """
        names = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "y_mean", "y_std", "dims"}
        if set(tensors) != names:
            raise ValueError(f"scorer tensors: missing {sorted(names - set(tensors))}, unexpected "
                             f"{sorted(set(tensors) - names)[:5]}; send UtilityScorer.to_tensors()")
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise ValueError(f"scorer tensor {name}: expected a float32 tensor")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"scorer tensor {name}: contains NaN or Inf")
        dims = tensors["dims"]
        if dims.shape != (2,) or not all(float(v).is_integer() and 1 <= v <= 1e6 for v in dims.tolist()):
            raise ValueError(f"scorer tensor dims: expected [dim, hidden] as two integers, got {dims.tolist()}")
        d, h = (int(v) for v in dims.tolist())
        shapes = {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (1, h), "fc2.bias": (1,),
                  "y_mean": (1,), "y_std": (1,)}
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"scorer tensor {name}: shape {tuple(tensors[name].shape)}, expected {shape}")
        if float(tensors["y_std"]) <= 0:
            raise ValueError("scorer tensor y_std must be > 0")
        if dim is not None and d != dim:
            raise ValueError(f"the scorer expects {d} features, ours have {dim}: both sides must build "
                             "RowFeaturizer from the same table schema")
        scorer = cls(d, h)
        scorer.load_state_dict({k: tensors[k].clone() for k in shapes})
        return scorer


def scorer_nbytes(scorer: UtilityScorer) -> int:
    """Bytes of the tensors that travel (float32)."""
    return sum(t.numel() * 4 for t in scorer.to_tensors().values())


# ------------------------------------------------------------------------ weights and rewards


def sample_weights(scores, temperature: float = 1.0, mode: str = "softmax", *,
                   standardize: bool = True, floor: float = 0.0) -> np.ndarray:
    """Per-sample weights with mean 1 over the set, for level 1's weighted loss.

    'softmax': w = n * softmax(z / temperature), z = the scores z-scored over the set when
    `standardize` (D: influence scales differ by orders of magnitude between models and rounds, so
    a fixed temperature only means something in units of the set's spread), else the raw scores.
    temperature = inf gives uniform weights; temperature -> 0 puts all weight on the maximum.
    'clip': w = max(s, 0) / mean(max(s, 0)); uniform when no score is > 0 (temperature unused).
    `floor` in [0, 1] mixes in uniform weight, w <- (1 - floor) w + floor (mean stays 1).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all():
        raise ValueError(f"sample_weights needs a non-empty 1-D array of finite scores, got shape {s.shape}")
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r} is not one of {WEIGHT_MODES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (inf for uniform weights), got {temperature}")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if mode == "clip":
        pos = np.maximum(s, 0.0)
        w = pos / pos.mean() if pos.sum() > 0 else np.ones_like(s)
    elif math.isinf(temperature):
        w = np.ones_like(s)
    else:
        if standardize:
            s = _zscore(s)
        e = np.exp((s - s.max()) / temperature)
        w = len(s) * e / e.sum()
    return (1.0 - floor) * w + floor


def local_utility(scorer: UtilityScorer, X) -> np.ndarray:
    """Client k's own utility phi_k(x) (influence scale): what level 1's weights come from."""
    return scorer.score(X)


def ensemble_utility(scorers: Sequence[UtilityScorer], X, weights=None) -> np.ndarray:
    """Level 3's reward signal: r(x) = sum_j a_j z_j(x) / sum_j a_j over the shared scorers {phi_j}.

    z_j = phi_j's scores z-scored across the given rows (D): each client's influence scale depends on
    its own validation gradient norm, so a raw mean would follow whichever client's scale is largest.
    A scorer that gives every row the same score contributes 0. Because z uses the rows' own mean and
    spread, call it on a whole batch (all GRPO groups of a step), not one row at a time.
    `weights` a_j >= 0 (e.g. clients' data sizes) default to equal.
    """
    if len(scorers) == 0:
        raise ValueError("ensemble_utility needs at least one scorer")
    a = np.ones(len(scorers)) if weights is None else np.asarray(weights, dtype=np.float64)
    if a.shape != (len(scorers),) or not np.isfinite(a).all() or (a < 0).any() or a.sum() <= 0:
        raise ValueError(f"weights must be {len(scorers)} finite values >= 0 with a positive sum, got {weights}")
    total = 0.0
    for scorer, weight in zip(scorers, a):
        total = total + weight * _zscore(scorer.score(X))
    return total / a.sum()


def _zscore(s: np.ndarray) -> np.ndarray:
    """(s - mean) / std; zeros when the spread is only rounding noise (a constant score)."""
    std = s.std()
    return (s - s.mean()) / std if std > 1e-12 * np.abs(s).max() else np.zeros_like(s)


# --------------------------------------------------------------------------- one client refresh


@dataclass
class ScorerFit:
    scorer: UtilityScorer
    """The refreshed scorer (a new object; the one passed in is left as it was)."""
    rows: np.ndarray
    """Positions into the synthetic rows whose influence was computed."""
    targets: np.ndarray
    """Their influence u (float64)."""
    loss: float
    """Final training loss of the scorer (on z-scored targets)."""


def fit_client_scorer(model, params: Sequence[torch.nn.Parameter], data: EncodedExamples,
                      features: np.ndarray, val: EncodedExamples, pad_id: int,
                      cfg: ScorerConfig | None = None, scorer: UtilityScorer | None = None,
                      rng: np.random.Generator | None = None) -> ScorerFit:
    """Compute influence on a random subset of a client's synthetic rows and fit (or refresh) its scorer.

    `model` holds the client's current task LoRA; `data` / `features` are the synthetic rows'
    encodings (`encode_rows`) and features (`RowFeaturizer.transform`), row-aligned; `val` is the
    client's private validation encoding. A given `scorer` is copied and warm-started.
    """
    cfg = cfg or ScorerConfig()
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(data):
        raise ValueError(f"features of shape {features.shape} must have one row per encoded row ({len(data)})")
    if len(data) < 2:
        raise ValueError(f"fit_client_scorer needs >= 2 synthetic rows, got {len(data)}")
    rows = np.sort(rng.choice(len(data), size=min(cfg.subset, len(data)), replace=False))
    targets = influence_targets(model, params, data.subset(rows), val, pad_id, cfg.batch_size,
                                method=cfg.influence, fd_step=cfg.fd_step)
    scorer = copy.deepcopy(scorer) if scorer is not None else UtilityScorer(features.shape[1], cfg.hidden, cfg.seed)
    loss = scorer.fit(features[rows], targets, cfg.epochs, cfg.lr, cfg.weight_decay,
                      seed=int(rng.integers(2**31)), rank_weight=cfg.rank_weight)
    return ScorerFit(scorer, rows, targets, loss)
