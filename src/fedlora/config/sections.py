"""The run configuration's sections: one dataclass per YAML section, and `RunConfig` holding them all.

Fields carry their defaults and, in the docstring under each, what the value means. Types and
allowed values are enforced when a config is built from a mapping (`fedlora.config.loading`)
and by `fedlora.config.validate`; checks that need other fedlora modules (the topology graph,
attack names) run in `fedlora.fl.preflight` before a run starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedlora.config.concordia import ConcordiaConfig
from fedlora.config.cuma import CumaConfig
from fedlora.config.typed import frame_label, is_frame


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
    precision: str = "auto"
    """Compute precision of forward and backward passes: 'auto' (bf16 autocast on CUDA with bf16
    support and on CPUs with bf16 units, avx512_bf16 or AMX; fp32 elsewhere), 'fp32' or 'bf16'.
    LoRA parameters, optimizer state and payloads stay fp32 either way (model/precision.py)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for longer prompts or bigger models."""
    quantization: str = "none"
    """Load the frozen base weights as 'none', '4bit' (QLoRA, NF4) or '8bit', through bitsandbytes;
    CUDA only (refused on a CPU with a clear message)."""


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
    task: str = "classification"
    """'classification' (rows scored by label likelihood) or 'generation' (prompt -> free-form
    response, scored by ROUGE, exact match and perplexity; data/generation.py, docs/data.md)."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str = "system"
    """task=generation: the fields (JSONL keys or CSV columns) holding the prompt, the reference
    response (the training target) and an optional per-record system message."""
    messages_field: str = "messages"
    """task=generation: an optional chat ([{role, content}]); its last assistant turn is the response."""
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
    clients: list[dict[str, Any]] | None = None
    """A federation from several sources, one entry per source: {source, target, columns, task, name,
    clients (how many clients it holds, default 1), partition: {...}, ...} (config/sources.py,
    docs/data.md 'Several sources'); `source` and the partition section are then per entry."""


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
    optimizer: str = "adamw"
    """'adamw' (torch) or 'paged_adamw_8bit' (bitsandbytes, CUDA only: 8-bit moments, paged to host
    memory under pressure)."""


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
    sampling: str = "auto"
    """Client sampling: 'fixed' (exactly round(client_fraction * N) of N, without replacement),
    'poisson' (each client joins a round with probability client_fraction), or 'auto': poisson
    when dp is on (the sampler its accountant assumes), fixed otherwise (fl/server_runtime.py)."""
    max_examples: int = 10_000_000
    """The largest example count a payload may report (`num_examples`, a client's own word); in
    simulation a client's declared data size caps it further. Above it the payload is rejected."""


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
    max_new_tokens: int = 64
    samples: int = 3
    """data.task=generation: the most tokens greedy decoding writes per prompt, and the prompts per
    evaluated set whose answers go to samples.jsonl."""
    calibration: str = "both"
    """Calibrated decisions beside the raw argmax (train/calibration.py, docs/calibration.md):
    'none', 'contextual' (content-free prompts, arXiv 2101.09690; no labels), 'bias' (inverse
    temperature + per-class bias fitted on the client's own validation split) or 'both' (the
    default: it won on the clients' own test splits, docs/benchmarks.md). Rows then carry
    accuracy_cal, macro_f1_cal, auroc_cal, ece_cal beside the raw accuracy, macro_f1, auroc, ece;
    'both' also reports its contextual and bias parts. Zero-shot rows are calibrated the same way."""
    global_calibration: str = "pooled_val"
    """What calibrates the global adapter on the global (and shifted) test: 'pooled_val' (every
    client's validation score matrix and labels under the global adapter, pooled: a client shares
    those [n_val, C] scores and labels, never prompts or rows) or 'holdout' (simulation only: rows of
    the global-test pool beyond eval.max_examples, drawn like the global test and never scored
    as test; needs such rows)."""


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
class ReportConfig:
    """What a run writes besides its files (fedlora/report/trackers.py, docs/usage.md)."""

    log_to: list[str] = field(default_factory=list)
    """Experiment trackers fed every round with metrics.jsonl's numbers: 'tensorboard' (event files
    in RUN_DIR/tensorboard) and/or 'mlflow' (MLFLOW_TRACKING_URI, else a file store in
    RUN_DIR/mlruns). Both need `pip install "fedlora[trackers]"`. Empty: none."""


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
    cuma: CumaConfig = field(default_factory=CumaConfig)
    """CuMA's mixture of LoRA experts (config/cuma.py); used by fl.method=cuma."""
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: a source given in Python as a frame is shown by its label (typed.frame_label)."""
        clients = self.data.clients
        if clients and any(isinstance(e, dict) and is_frame(e.get("source")) for e in clients):
            shown = [{**e, "source": frame_label(e["source"])} if isinstance(e, dict) and is_frame(e.get("source"))
                     else e for e in clients]
            return dataclasses.asdict(dataclasses.replace(self, data=dataclasses.replace(self.data, clients=shown)))
        return dataclasses.asdict(self)
