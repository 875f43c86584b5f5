"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides.

A config is a tree of dataclasses. Unknown keys and wrong types fail early with a message that
names the key and lists the valid ones, so a typo in a YAML file never silently falls back to a
default.

>>> cfg = load_config(None, ["fl.rounds=3", "partition.num_clients=2"])
>>> cfg.fl.rounds, cfg.partition.num_clients
(3, 2)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """'smollm2-135m' (embedded, offline), 'tiny' (random Llama for tests), a Hugging Face id, a local
    directory, or a .gguf file."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """'auto' (bf16 on CUDA when supported, fp32 on CPU), 'float32', 'bfloat16', 'float16'."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataConfig:
    source: str = "breast-cancer"
    """A built-in name ('breast-cancer', 'german-credit'), or a path to .csv, .parquet or .jsonl."""
    target: str | None = None
    """Target column; built-ins know theirs; required for user CSV/Parquet ('label' for JSONL)."""
    columns: list[str] | None = None
    """Feature columns to keep (in this order); None keeps all."""
    max_rows: int | None = None
    """Keep at most this many rows (a seeded stratified sample); None keeps all."""
    number_format: str = "digits"
    """'digits' (fixed significant digits) or 'quantile' (words such as 'low', 'high' learned from
    each client's own training rows)."""
    digits: int = 3
    quantile_bins: int = 5
    max_rare_fraction: float = 0.01
    """Categories rarer than this share of rows are grouped as 'other'. 0 disables grouping."""
    prompt_style: str = "auto"
    """'auto' (the tokenizer's chat template when it has one, else plain), 'chat' or 'plain'."""
    system_prompt: str | None = "Answer with one of the options."
    """System message in chat style (None: none; the template may then insert its default)."""
    max_length: int = 384
    """Token cap for one serialized example; longer prompts are cut from the left of the features."""
    global_test_fraction: float = 0.2
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    shift_column: str | None = None
    """A numeric column whose top range becomes a shifted test set no client ever sees (rows with
    a value above its `shift_quantile` quantile are held out before partitioning); scored with the
    global adapter as the 'shifted' row (robustness to distribution shift)."""
    shift_quantile: float = 0.8


@dataclass
class PartitionConfig:
    scheme: str = "dirichlet"
    """'iid', 'dirichlet' (label skew), 'quantity' (size skew), or 'column' (natural split)."""
    num_clients: int = 4
    alpha: float = 0.5
    """Dirichlet concentration for label or quantity skew; smaller is more skewed."""
    column: str | None = None
    """Column whose values define clients when scheme='column'."""
    min_rows: int = 10
    """Every client gets at least this many rows (re-drawn otherwise)."""


@dataclass
class TrainConfig:
    lr: float = 5e-4
    batch_size: int = 8
    micro_batch_size: int | None = None
    """Split each batch into micro-batches of this size (gradient accumulation); None = no split."""
    local_steps: int = 5
    local_epochs: float | None = None
    """If set, overrides local_steps with ceil(epochs * rows / batch_size)."""
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer_state: str = "reset"
    """'reset' (fresh AdamW moments every round) or 'keep' (each client keeps its own across rounds)."""


@dataclass
class FLConfig:
    method: str = "fedit"
    rounds: int = 5
    client_fraction: float = 1.0
    """Share of clients sampled each round (at least one)."""
    eval_every: int = 1
    """Evaluate every k rounds (the last round is always evaluated). 0 = only at the end."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """Method-specific options, documented in each method's docstring."""
    checkpoint: bool = True
    """Write an atomic checkpoint after every round (run_dir/checkpoints/; docs/reliability.md), so
    `fedlora resume RUN_DIR` can continue a run that was killed."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (2: a corrupted newest one falls back to the last)."""
    dropout: float = 0.0
    """Probability that a sampled client is unavailable in a round (no download, no training), drawn
    per (seed, round, client) (fl/faults.py)."""
    deadline: float | None = None
    """Simulated seconds the server waits for replies; a client's round takes Exponential(latency)
    seconds, and one past the deadline is a straggler. None: no deadline."""
    latency: float = 1.0
    """Mean simulated seconds of a client's round (only used with a deadline)."""
    straggler_policy: str = "drop"
    """'drop' (a late update is discarded) or 'stale' (applied in the next round, weighted by staleness)."""
    staleness: float = 0.5
    """With straggler_policy=stale: a late update's example count is multiplied by this, in (0, 1]."""
    min_replies: int = 1
    """Fewest valid updates that make a round count; below it the round is skipped and logged, and
    the server state is left unchanged. The centralized reference always needs its one reply."""


@dataclass
class EvalConfig:
    max_examples: int | None = None
    """Cap on examples per evaluation set (seeded subsample); None = all."""
    batch_size: int = 16
    zero_shot: bool = True
    """Score the untrained base model once before round 1."""
    baseline: str = "logreg"
    """Classical baseline on the same client splits: 'logreg', 'gboost' or 'none'."""
    global_test: bool = True


@dataclass
class RobustConfig:
    """Byzantine clients and robust aggregation in the simulator (docs/robustness.md).

    The defaults reproduce a run without any of it. Everything here acts on *updates*: a client's
    upload minus what it started the round from (the server's download, identical for every
    client of the methods that support this section).
    """

    aggregator: list[Any] | None = None
    """A robust aggregation chain (pre-aggregators then one rule, names or {name: options}, e.g.
    [nnm, trimmed_mean]); None keeps the method's own aggregation. Only for methods whose server
    step starts from a weighted mean of the uploads (fedit, fedprox, ffa, fedsa, fedavgm, fedadagrad,
    fedadam, fedyogi): the chain replaces that mean, computed on the clients' updates (upload
    minus download) with one vote per client ('mean' alone keeps the example-count weights), and
    the method's server step then runs on the result. Other methods refuse it (ValueError)."""
    f: int = 0
    """Byzantine clients the chain tolerates (its f); checked against the clients sampled per round
    before the run starts."""
    byzantine: int = 0
    """How many clients are Byzantine: ids from attacks.choose_byzantine(num_clients, byzantine,
    seed), written to byzantine.json; their metric rows carry "byzantine": true."""
    attack: str = "none"
    """What Byzantine clients send: 'none' (they behave honestly, or train on flipped labels with
    label_flip), an update attack of fedlora.fl.attacks (sign_flip, ipm, alie, gaussian, mimic, inf,
    optimal_ipm, optimal_alie; computed from this round's honest updates, omniscient), or
    'malformed:<kind>' (attacks.MALFORMED_KINDS: nan, wrong_shape, pickle, ...), which the server
    rejects on decode. Under an update or malformed attack Byzantine clients do not train (what
    they would train is discarded anyway)."""
    attack_args: dict[str, Any] = field(default_factory=dict)
    """Options of the update attack (e.g. {scale: 100} for sign_flip)."""
    label_flip: bool = False
    """Data attack: Byzantine clients train honestly on their rows with labels reversed
    (c -> C-1-c). Needs attack='none'."""
    momentum: float | None = None
    """Worker momentum beta in [0, 1) for honest clients (arXiv 2604.10179): with g_t = trained -
    started (per uploaded tensor), the client keeps m_t = beta m_(t-1) + (1 - beta) g_t (m_0 = 0)
    and uploads started + m_t instead of trained, so the server's mean or robust rule combines
    momentum-smoothed updates. beta = 0 sends trained. None: no momentum."""


@dataclass
class DPConfig:
    """User-level differential privacy: DP-FedAvg at the server (fl/dp.py, docs/privacy.md).

    Off by default. Each sampled client's update (upload minus download, all uploaded tensors as
    one vector) is clipped to L2 norm `clip`; the server sums the clipped updates, adds
    N(0, (noise_multiplier * clip)^2) per coordinate and divides by m, the number of clients sampled
    per round (uniform weights: example counts are ignored). Only for methods whose server step
    starts from a weighted mean (fedit, fedprox, ffa, fedsa, fedavgm, fedadagrad, fedadam, fedyogi);
    not with robust.aggregator or fl.straggler_policy=stale.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    """z: noise std on the sum of clipped updates is z * clip. 0 = clipping only (epsilon = inf)."""
    clip: float = 0.1
    """C: L2 bound on each client's update (the initial C with adaptive clipping). .inf = no
    clipping, allowed only with noise_multiplier 0. 0.1 is Andrew et al.'s initial C."""
    adaptive: bool = False
    """Adaptive clipping (Andrew et al., arXiv 1905.03871): C follows the target quantile of the
    update norms; the update noise is then z_update = (z^-2 - (2 count_noise)^-2)^-1/2."""
    target_quantile: float = 0.5
    """gamma: the share of updates left unclipped that C aims at (paper: 0.5, the median)."""
    clip_lr: float = 0.2
    """eta: geometric step C <- C exp(-eta (b - gamma)) (paper: 0.2)."""
    count_noise: float | None = None
    """sigma_b: std of the noise on the unclipped count; None = m / 20 (the paper's choice)."""
    delta: float | None = None
    """delta of the reported (epsilon, delta); None = min(1e-5, num_clients^-1.1)."""
    target_epsilon: float | None = None
    """Stop the run before the round that would take epsilon past this value; None = never."""
    accountant: str = "rdp"
    """'rdp' (Renyi DP, opacus RDPAccountant) or 'prv' (opacus PRVAccountant, tighter)."""


@dataclass
class TopologyConfig:
    """The graph decentralized (gossip) methods run on (fl/topology.py, docs/decentralized.md).

    Server-based methods ignore this section.
    """

    graph: str = "ring"
    """'ring', 'torus' (2-D, rows x cols = num_clients), 'complete', 'kregular', 'erdos_renyi' (re-drawn
    every round), 'pairwise' (a random matching re-drawn every round) or 'edges' (edges_file)."""
    p: float = 0.5
    """erdos_renyi: probability of each edge in a round."""
    q: float = 0.1
    """pairwise: probability that a matched pair meets in a round."""
    k: int = 4
    """kregular: every client's number of neighbours (k < num_clients, k * num_clients even)."""
    edges_file: str | None = None
    """edges: a text file with one 'i j' line per undirected edge (client ids from 0)."""
    weights: str = "metropolis"
    """'metropolis' (Metropolis-Hastings: symmetric, doubly stochastic) or 'uniform' (1 / (1 + degree)
    on each neighbour and on oneself: row-stochastic only)."""
    rho_samples: int = 200
    """Random graphs: draws averaged to estimate E[W^T W] for the mixing rate rho."""


@dataclass
class ConcordiaConfig:
    """Concordia (arXiv 2605.09855; fl/concordia.py, docs/concordia.md): clients train the task LoRA
    on synthetic rows only, from their own LLM table generator, reweighted by utility scorers;
    the generators are refined with GRPO rewarded by the ensemble of shared scorers.

    Off unless `enabled`; `fl.method` is the server method that federates the task LoRA.
    """

    enabled: bool = False
    variant: str = "concordia"
    """'concordia' (the method), or a baseline on the same budget: 'static' (generate once, no
    reweighting, no refinement), 'decoupled' (fresh rows every round from the generator fitted
    for fidelity only, GReaT's likelihood on real rows, never refined toward the task; no
    reweighting), 'uniform' (no reweighting), 'local' (GRPO rewarded by the client's own scorer
    only, no ensemble)."""
    synthetic_rows: int = 64
    """Rows each training client samples per round (valid rows are kept; the validity rate is logged)."""
    refine_every: int = 1
    """Rounds between GRPO refinements of the generator (variants concordia, uniform, local)."""
    quality_every: int = 1
    """Rounds between synthetic-table quality reports (0: never)."""
    generator: dict[str, Any] = field(default_factory=dict)
    """synth.generator.GeneratorConfig fields (fit steps, lr, temperature, ...)."""
    grpo: dict[str, Any] = field(default_factory=dict)
    """synth.grpo.GRPOConfig fields (group size, prompts, steps, beta, clip, lr)."""
    scorer: dict[str, Any] = field(default_factory=dict)
    """synth.scorer.ScorerConfig fields (hidden, epochs, subset, temperature, weight mode)."""
    reward: dict[str, Any] = field(default_factory=dict)
    """synth.generator reward terms (validity weight, copy penalty and its distance threshold)."""


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    concordia: ConcordiaConfig = field(default_factory=ConcordiaConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.number_format": {"digits", "quantile"},
    "data.prompt_style": {"auto", "chat", "plain"},
    "partition.scheme": {"iid", "dirichlet", "quantity", "column"},
    "train.optimizer_state": {"reset", "keep"},
    "fl.straggler_policy": {"drop", "stale"},
    "eval.baseline": {"logreg", "gboost", "none"},
    "dp.accountant": {"rdp", "prv"},
    "topology.graph": {"ring", "torus", "complete", "kregular", "erdos_renyi", "pairwise", "edges"},
    "topology.weights": {"metropolis", "uniform"},
    "concordia.variant": {"concordia", "static", "decoupled", "uniform", "local"},
}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint of `key`; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):  # NaN passes no range check, so it would slip through validate()
            raise ConfigError(f"{key}: expected a number, got NaN")
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, bool, str) and type(value) is hint:
        return value
    if hint is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        # YAML 1.1 reads 5e-4 (no decimal point) as a string; accept it as the number it is.
        return float(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
            if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {sorted(_CHOICES[key])}")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. fl.rounds=3)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty `section:` line in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0][:120]}); "
                              "quote it, e.g. key='[a'") from None
    return data


_MAX_VALUES, _MAX_DEPTH = 100_000, 32


def _check_extent(data: Any) -> None:
    """Refuse documents too large or too deep to be a config: YAML aliases (&a, *a) may expand
    exponentially or refer to themselves, and to_dict()/safe_dump would then never finish."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES or depth > _MAX_DEPTH:
            raise ConfigError(f"config is too large or nested too deeply (over {_MAX_VALUES} values or "
                              f"{_MAX_DEPTH} levels, YAML aliases counted as copies); check for an alias "
                              "that refers to itself (&a [*a])")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              f"(e.g. 'fl: {{rounds: 3}}'), got a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    _check_extent(data)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a type check cannot express."""
    checks = [
        (cfg.fl.rounds >= 1, "fl.rounds must be >= 1"),
        (0 < cfg.fl.client_fraction <= 1, "fl.client_fraction must be in (0, 1]"),
        (cfg.partition.num_clients >= 1, "partition.num_clients must be >= 1"),
        (cfg.partition.alpha > 0, "partition.alpha must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.local_steps >= 1, "train.local_steps must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.lora.r >= 1, "lora.r must be >= 1"),
        (cfg.lora.target_modules, "lora.target_modules must name at least one module"),
        (0 <= cfg.data.global_test_fraction < 1, "data.global_test_fraction must be in [0, 1)"),
        (
            0 <= cfg.data.val_fraction and 0 <= cfg.data.test_fraction
            and cfg.data.val_fraction + cfg.data.test_fraction < 1,
            "data.val_fraction + data.test_fraction must be < 1",
        ),
        (
            cfg.partition.scheme != "column" or cfg.partition.column,
            "partition.scheme=column needs partition.column (e.g. --set partition.column=age_band)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_faults(cfg)
    _validate_robust(cfg)
    from fedlora.fl.topology import check_topology  # a graph that cannot be built fails here

    check_topology(cfg.topology, cfg.partition.num_clients)


def _validate_faults(cfg: RunConfig) -> None:
    fl = cfg.fl
    sampled = max(1, round(fl.client_fraction * cfg.partition.num_clients))
    checks = [
        (fl.keep_checkpoints >= 1, "fl.keep_checkpoints must be >= 1 (2 lets a corrupted newest one fall back)"),
        (0 <= fl.dropout < 1, "fl.dropout must be in [0, 1) (a probability per client per round)"),
        (fl.deadline is None or fl.deadline > 0, "fl.deadline must be > 0 simulated seconds (or null: none)"),
        (fl.latency > 0, "fl.latency must be > 0 (mean simulated seconds of a client's round)"),
        (0 < fl.staleness <= 1, "fl.staleness must be in (0, 1] (the weight of a late update)"),
        (fl.min_replies >= 1, "fl.min_replies must be >= 1"),
        (fl.min_replies <= sampled,
         f"fl.min_replies={fl.min_replies} exceeds the {sampled} clients sampled per round, so every round "
         "would be skipped; lower it or raise fl.client_fraction / partition.num_clients"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_dp(cfg)


def _validate_dp(cfg: RunConfig) -> None:
    """DP settings that need no model; the method and m are checked by the simulator (fl/dp.py)."""
    dp = cfg.dp
    if not dp.enabled:
        return
    inf = float("inf")
    checks = [
        (0 <= dp.noise_multiplier < inf, "dp.noise_multiplier must be a finite number >= 0"),
        (dp.clip > 0, "dp.clip must be > 0 (.inf for no clipping)"),
        (dp.clip < inf or dp.noise_multiplier == 0,
         "dp.clip=.inf (no clipping) needs dp.noise_multiplier=0: the noise is noise_multiplier * clip"),
        (dp.clip < inf or not dp.adaptive, "dp.adaptive needs a finite initial dp.clip"),
        (0 <= dp.target_quantile <= 1, "dp.target_quantile must be in [0, 1]"),
        (dp.clip_lr >= 0, "dp.clip_lr must be >= 0"),
        (dp.count_noise is None or dp.count_noise >= 0, "dp.count_noise must be >= 0 (or null for m / 20)"),
        (dp.delta is None or 0 < dp.delta < 1, "dp.delta must be in (0, 1) (or null)"),
        (dp.target_epsilon is None or dp.target_epsilon > 0, "dp.target_epsilon must be > 0 (or null)"),
        (cfg.robust.aggregator is None,
         "dp and robust.aggregator cannot be combined: DP noise is calibrated to the sum of clipped updates, "
         "which a robust rule replaces (set one of them)"),
        (cfg.fl.straggler_policy != "stale",
         "dp and fl.straggler_policy=stale cannot be combined: a late update applied in the next round can add a "
         "second clipped update of one client to that round, doubling the sensitivity the noise assumes"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _validate_robust(cfg: RunConfig) -> None:
    rb, n = cfg.robust, cfg.partition.num_clients
    checks = [
        (rb.f >= 0, "robust.f must be >= 0"),
        (0 <= rb.byzantine < n, f"robust.byzantine must be in [0, partition.num_clients) = [0, {n})"),
        (rb.momentum is None or 0 <= rb.momentum < 1, "robust.momentum must be in [0, 1) (or null)"),
        (rb.aggregator is None or len(rb.aggregator) > 0, "robust.aggregator must name at least a rule (or be null)"),
        (rb.attack == "none" or rb.byzantine >= 1, f"robust.attack={rb.attack} needs robust.byzantine >= 1"),
        (not rb.label_flip or rb.byzantine >= 1, "robust.label_flip needs robust.byzantine >= 1"),
        (not (rb.label_flip and rb.attack != "none"),
         "robust.label_flip and robust.attack are alternative Byzantine behaviours; set attack=none to flip labels"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if rb.attack != "none":
        from fedlora.fl.attacks import MALFORMED_KINDS, available_attacks

        if rb.attack.startswith("malformed:"):
            kind = rb.attack.split(":", 1)[1]
            if kind not in MALFORMED_KINDS:
                raise ConfigError(f"robust.attack: unknown malformed kind {kind!r}; one of {', '.join(MALFORMED_KINDS)}")
        elif rb.attack not in available_attacks():
            raise ConfigError(f"robust.attack: {rb.attack!r} is not 'none', 'malformed:<kind>' or one of "
                              f"{', '.join(available_attacks())}")
