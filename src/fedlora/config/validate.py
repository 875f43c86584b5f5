"""Value checks on a built `RunConfig` that a type check cannot express (ranges, cross-field rules).

Only the config itself is consulted here. Checks that need other fedlora modules (whether the
topology graph can be built on the clients, whether robust.attack names a registered attack)
live in `fedlora.fl.preflight`, which every entry point runs before expensive work.
"""

from __future__ import annotations

import difflib

from fedlora.config.cuma import validate_cuma
from fedlora.config.errors import ConfigError
from fedlora.config.sections import RunConfig

TRACKERS = ("tensorboard", "mlflow")
"""report.log_to names (fedlora/report/trackers.py writes them; declared here, where config is checked)."""
PRECISIONS = ("auto", "fp32", "bf16")
"""model.precision names (fedlora/model/precision.py resolves them)."""
QUANTIZATIONS = ("none", "4bit", "8bit")
"""model.quantization names (CUDA only; fedlora/model/precision.py)."""
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
"""train.optimizer names (paged_adamw_8bit is CUDA only; fedlora/model/precision.py)."""
CALIBRATIONS = ("none", "contextual", "bias", "both")
"""eval.calibration names (fedlora/train/calibration.py fits them)."""
GLOBAL_CALIBRATIONS = ("pooled_val", "holdout")
"""eval.global_calibration names (fedlora/fl/scoring.py forms the calibration set)."""
TASKS = ("classification", "generation")
"""data.task names (fedlora/data/generation.py reads generation records)."""


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
    _validate_report(cfg)
    _validate_eval(cfg)
    _validate_task(cfg)
    validate_cuma(cfg.cuma, cfg.fl.method)
    _validate_sources(cfg)


def _validate_sources(cfg: RunConfig) -> None:
    """data.clients: every entry (config/sources.py), each source's own config, and the features a
    federation of several tables cannot take yet."""
    from fedlora.config.sources import source_specs, spec_config

    if cfg.data.clients is None:
        return
    unsupported = [("concordia.enabled", cfg.concordia.enabled, "false"),
                   ("data.shift_column", cfg.data.shift_column is not None, "null"),
                   ("fl.method=cuma", cfg.fl.method == "cuma", "another method (cuma profiles read one table)")]
    for key, bad, fix in unsupported:
        if bad:
            raise ConfigError(f"{key} does not apply to a federation of several sources (data.clients) yet; "
                              f"set {key.split('=')[0]} to {fix}, or use one data.source")
    for spec in source_specs(cfg):
        try:
            validate(spec_config(cfg, spec))
        except ConfigError as exc:
            raise ConfigError(f"data.clients[{spec.index}] ({spec.name}): {exc}") from None


def _validate_task(cfg: RunConfig) -> None:
    """data.task, and the features that need class labels, which a generation task has none of.

    Calibration and the classical baseline are label-only too, but they are skipped on a
    generation task rather than refused (eval.calibration defaults to 'both')."""
    if cfg.data.task not in TASKS:
        close = difflib.get_close_matches(str(cfg.data.task).lower(), TASKS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"data.task: unknown value {cfg.data.task!r}{hint} (choose one of: {', '.join(TASKS)})")
    if cfg.eval.max_new_tokens < 1 or cfg.eval.samples < 0:
        raise ConfigError("eval.max_new_tokens must be >= 1 and eval.samples >= 0")
    if cfg.data.task != "generation":
        return
    if cfg.fl.method == "cuma":
        raise ConfigError("fl.method=cuma does not run on data.task=generation yet; pick another method "
                          "(e.g. fl.method=fedit)")
    label_only = [("robust.label_flip", cfg.robust.label_flip, "false (a free-form answer has no label to flip)"),
                  ("concordia.enabled", cfg.concordia.enabled, "false (Concordia synthesizes table rows)"),
                  ("data.shift_column", cfg.data.shift_column is not None, "null (it names a numeric table column)")]
    for key, bad, fix in label_only:
        if bad:
            raise ConfigError(f"{key} does not apply to data.task=generation; set {key}={fix}")


def _validate_eval(cfg: RunConfig) -> None:
    """Names chosen from a fixed list (eval, precision, quantization, optimizer)."""
    for key, value, options in (("eval.calibration", cfg.eval.calibration, CALIBRATIONS),
                                ("eval.global_calibration", cfg.eval.global_calibration, GLOBAL_CALIBRATIONS),
                                ("model.precision", cfg.model.precision, PRECISIONS),
                                ("model.quantization", cfg.model.quantization, QUANTIZATIONS),
                                ("train.optimizer", cfg.train.optimizer, OPTIMIZERS)):
        if value not in options:
            close = difflib.get_close_matches(str(value).lower(), options, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown value {value!r}{hint} (choose one of: {', '.join(options)})")
    ev = cfg.eval
    if (ev.calibration != "none" and ev.global_calibration == "holdout" and ev.global_test
            and ev.max_examples is None):
        raise ConfigError("eval.global_calibration=holdout calibrates on global-test rows beyond eval.max_examples, "
                          "and eval.max_examples is null (every row is test); set eval.max_examples or "
                          "eval.global_calibration=pooled_val")


def _validate_report(cfg: RunConfig) -> None:
    for name in cfg.report.log_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name.lower(), TRACKERS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"report.log_to: unknown tracker {name!r}{hint} (available: {', '.join(TRACKERS)})")


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
        (fl.max_examples >= 1, "fl.max_examples must be >= 1 (the cap on a payload's reported example count)"),
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
