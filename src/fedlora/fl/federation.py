"""Everything a simulated federation shares: one frozen base model, the table, the client splits.

`prepare()` loads the model once, wraps it with LoRA once, partitions the table and tokenizes
every client's rows with that client's own serializer (quantile words are learned from the
client's own training rows, never from other clients'). Several methods can then run on the same
`Federation` one after another, on identical partitions and identical initial adapters.
"""

from __future__ import annotations

import numpy as np

from fedlora.config import ConfigError, RunConfig
from fedlora.config.sources import source_specs, spec_config
from fedlora.data import (
    DataError,
    Partition,
    RowSerializer,
    Table,
    load_table,
    make_partition,
)
from fedlora.fl.preflight import preflight
from fedlora.fl.sources import load_sources
from fedlora.fl.splits import ClientSplits, Federation  # noqa: F401  (re-exported)
from fedlora.fl.splits import cap_rows as _cap
from fedlora.model import load_model, wrap_lora
from fedlora.train.batches import EncodedExamples
from fedlora.train.encode import encode_rows


def _encode(fed_tokenizer, serializer: RowSerializer, table: Table, rows: np.ndarray,
            max_length: int) -> EncodedExamples:
    """Table rows at positions `rows`, encoded as Concordia encodes synthetic rows (a split may be empty)."""
    return encode_rows(fed_tokenizer, serializer, table, table.frame.iloc[rows], max_length, allow_empty=True)


def prepare(cfg: RunConfig, model=None, tokenizer=None, table: Table | list[Table] | None = None) -> Federation:
    """Load (or reuse) the model and table, partition, serialize and tokenize every split.

    With data.clients, `table` may be the list of the sources' tables (fl/sources.py)."""
    preflight(cfg)  # config checks that need the fl modules (topology, attack names), before any loading
    if cfg.data.clients is not None:  # several sources, each its own table and task (fl/sources.py)
        return prepare_sources(cfg, model, tokenizer, tables=table)
    # The table and partition first: a DataError shows before minutes of model loading.
    table = table if table is not None else load_table(cfg.data, seed=cfg.seed)
    partition = make_partition(table, cfg.partition, cfg.data, seed=cfg.seed)
    holdout_needed = table.kind != "generation" and _check_holdout(cfg, partition)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    if not hasattr(model, "peft_config"):
        model = wrap_lora(model, cfg.lora, seed=cfg.seed)
    if table.kind == "generation":  # prompt -> response records (fl/generation.py)
        from fedlora.fl.generation import prepare_generation

        return prepare_generation(cfg, model, tokenizer, table, partition)
    rng = np.random.default_rng([cfg.seed, 7])
    cap = cfg.eval.max_examples
    clients = []
    for client in partition.clients:
        serializer = RowSerializer(table, cfg.data).fit(table.frame.iloc[client.train])
        rows = {"train": client.train, "val": _cap(client.val, cap, rng), "test": _cap(client.test, cap, rng)}
        encoded = {k: _encode(tokenizer, serializer, table, v, cfg.data.max_length) for k, v in rows.items()}
        clients.append(ClientSplits(encoded["train"], encoded["val"], encoded["test"], rows))
    pooled_train = np.concatenate([c.train for c in partition.clients])
    # The global test is serialized with quantiles of the pooled training rows. Only the
    # 'quantile' number format depends on this; it is a simulation convenience (documented).
    global_serializer = RowSerializer(table, cfg.data).fit(table.frame.iloc[pooled_train])
    global_rows = _cap(partition.global_test, cap, rng)
    global_test = _encode(tokenizer, global_serializer, table, global_rows, cfg.data.max_length)
    shifted = None
    if len(partition.shifted_test):
        shifted = _encode(tokenizer, global_serializer, table, _cap(partition.shifted_test, cap, rng),
                          cfg.data.max_length)
    holdout = None
    if holdout_needed:  # its own stream: the draws above stay as they are without it
        rest = np.setdiff1d(partition.global_test, global_rows)
        holdout = _encode(tokenizer, global_serializer, table, _cap(rest, cap, np.random.default_rng([cfg.seed, 8])),
                          cfg.data.max_length)
    return Federation(cfg, model, tokenizer, table, partition, clients, global_test, global_rows, shifted, holdout)


def _check_holdout(cfg: RunConfig, partition: Partition) -> bool:
    """Whether the global test is calibrated on a holdout; ConfigError when the pool has no rows for one."""
    ev = cfg.eval
    if ev.calibration == "none" or ev.global_calibration != "holdout" or not ev.global_test:
        return False
    pool = len(partition.global_test)
    if ev.max_examples is None or pool <= ev.max_examples:
        raise ConfigError(f"eval.global_calibration=holdout needs global-test rows beyond eval.max_examples="
                          f"{ev.max_examples}, but the global-test pool has {pool}; lower eval.max_examples, "
                          "raise data.global_test_fraction, or set eval.global_calibration=pooled_val")
    return True


def prepare_sources(cfg: RunConfig, model=None, tokenizer=None, tables: list | None = None) -> Federation:
    """The joined Federation of every source in data.clients (see the module doc)."""
    specs = source_specs(cfg)
    tables = tables if tables is not None else load_sources(cfg)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    if not hasattr(model, "peft_config"):
        model = wrap_lora(model, cfg.lora, seed=cfg.seed)
    parts = []
    for spec, table in zip(specs, tables):
        try:
            parts.append(prepare(spec_config(cfg, spec), model=model, tokenizer=tokenizer, table=table))
        except (DataError, ConfigError) as exc:
            raise type(exc)(f"data.clients[{spec.index}] ({spec.name}): {exc}") from None
    clients = [c for part in parts for c in part.clients]
    empty = EncodedExamples([], np.zeros(0, dtype=np.int64), [])
    client_task = [s.name for s, part in zip(specs, parts) for _ in part.clients]
    return Federation(cfg, model, tokenizer, None, None, clients, empty, np.zeros(0, dtype=np.int64),
                      parts=parts, tasks=[s.name for s in specs], client_task=client_task)
