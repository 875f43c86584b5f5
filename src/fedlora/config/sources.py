"""`data.clients`: a federation where each institution brings its own source (issue 18).

    data:
      max_length: 384                 # run-wide data fields apply to every source
      clients:
        - {source: german-credit, clients: 2, partition: {scheme: dirichlet, alpha: 0.3}}
        - {source: breast-cancer, name: hospital}
        - {source: bank_b.csv, target: default, columns: [age, income, debt]}
        - {source: german-credit-qa, task: generation, clients: 2}

Each entry is one source: a built-in name or a .csv/.parquet/.jsonl path (in Python also a pandas
DataFrame or a Hugging Face `datasets.Dataset`; fl/sources.py), with its own target,
feature columns, task and any of the per-source data fields below. `clients` (default 1) clients
are cut from it by its own `partition` (the run's partition section unless the entry gives keys
of its own; num_clients is always `clients`). Everything else (max_length, prompt_style,
fractions, ...) comes from the run's `data` section. A source is one *task*: its clients share
its classes and verbalizer, it has its own global test, and results are reported per task and
overall (fl/sources.py). Client ids run over the entries in order: entry 0's clients first.

`source_specs` checks every entry (keys, types, counts) and names the entry and the fix; it runs
when the config is loaded, so nothing reads a file or writes a run before all entries are valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config.errors import ConfigError
from fedlora.config.sections import DataConfig, PartitionConfig, RunConfig
from fedlora.config.typed import MEMORY_PREFIX, as_frame, frame_label, from_dict, is_frame

PER_SOURCE = ("source", "target", "columns", "task", "max_rows", "prompt_field", "response_field",
              "system_field", "messages_field", "system_prompt", "number_format", "digits",
              "quantile_bins", "max_rare_fraction", "val_fraction", "test_fraction", "global_test_fraction")
"""DataConfig fields an entry may set for its own source; the others are run-wide."""
ENTRY_KEYS = (*PER_SOURCE, "name", "clients", "partition")
GLOBAL_PREFIX = "global:"
"""Metric rows of a source's own global test are for client 'global:<task>'."""
MAX_SOURCES = 64


@dataclass(frozen=True)
class SourceSpec:
    index: int
    """The entry's position in data.clients."""
    name: str
    """The task's name in results: the entry's `name`, else the built-in name or file stem."""
    data: DataConfig
    partition: PartitionConfig
    first_client: int
    """The federation-wide id of this source's first client."""
    frame: Any = field(default=None, compare=False, repr=False)
    """In Python, the pandas DataFrame given as the entry's source (a `datasets.Dataset` converted);
    then data.source is its label (typed.frame_label). None for a path or a built-in name."""

    @property
    def clients(self) -> int:
        return self.partition.num_clients


def is_multi_source(cfg: RunConfig) -> bool:
    return cfg.data.clients is not None


def _name(entry: dict, data: DataConfig, index: int) -> str:
    if entry.get("name") is not None:
        return str(entry["name"])
    source = str(data.source)
    if source.startswith(MEMORY_PREFIX):
        return f"frame-{index}"
    return Path(source).stem if any(source.lower().endswith(e) for e in (".csv", ".parquet", ".jsonl")) else source


def source_specs(cfg: RunConfig) -> list[SourceSpec]:
    """One checked spec per entry of `data.clients`; ConfigError naming `data.clients[i]` otherwise."""
    entries = cfg.data.clients
    if entries is None:
        return []
    if not entries:
        raise ConfigError("data.clients is empty; list one entry per source (e.g. [{source: german-credit}]) "
                          "or leave it out to partition data.source")
    if len(entries) > MAX_SOURCES:
        raise ConfigError(f"data.clients lists {len(entries)} sources; at most {MAX_SOURCES}")
    base = dataclasses.replace(cfg.data, clients=None)
    specs, first, seen = [], 0, {}
    for i, entry in enumerate(entries):
        where = f"data.clients[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{source: german-credit}}, got {entry!r:.60}")
        unknown = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; an entry takes: {', '.join(ENTRY_KEYS)} "
                              "(run-wide data fields such as max_length belong in the data section)")
        source = entry.get("source")
        if source is None or (isinstance(source, str) and not source.strip()):
            raise ConfigError(f"{where}: no source; give a built-in name (`fedlora datasets` lists them), "
                              "a .csv/.parquet/.jsonl path, or in Python a pandas DataFrame")
        frame = None
        if is_frame(entry["source"]):  # a DataFrame or Dataset given in Python: its label stands in
            frame = as_frame(entry["source"])
            entry = {**entry, "source": frame_label(entry["source"])}
        fields = {k: entry[k] for k in PER_SOURCE if k in entry}
        defaults = {k: getattr(base, k) for k in PER_SOURCE if k not in fields and k not in ("source", "target", "columns")}
        data = from_dict(DataConfig, {**defaults, **fields}, prefix=f"{where}.")
        data = dataclasses.replace(base, **{k: getattr(data, k) for k in PER_SOURCE})
        count = entry.get("clients", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}.clients must be an integer >= 1 (how many clients hold this source), "
                              f"got {count!r}")
        own = entry.get("partition")
        if own is not None and not isinstance(own, dict):
            raise ConfigError(f"{where}.partition: expected a mapping such as {{scheme: dirichlet, alpha: 0.5}}")
        if own and "num_clients" in own:
            raise ConfigError(f"{where}.partition.num_clients: set {where}.clients instead")
        part = (dataclasses.asdict(cfg.partition) if own is None else {"min_rows": cfg.partition.min_rows, **own})
        # one client holds the whole source: a split of one needs no scheme (a column scheme has no column here)
        part = {**part, "num_clients": count, **({"scheme": "iid"} if count == 1 else {})}
        partition = from_dict(PartitionConfig, part, prefix=f"{where}.partition.")
        if partition.scheme == "column" and not partition.column:
            raise ConfigError(f"{where}.partition: scheme=column needs a column (e.g. {{scheme: column, column: site}})")
        name = _name(entry, data, i)
        if name in seen:
            raise ConfigError(f"{where}: task name {name!r} is also data.clients[{seen[name]}]'s; give one of "
                              "them a distinct name (e.g. name: hospital-b), or one entry with clients: 2")
        seen[name] = i
        specs.append(SourceSpec(i, name, data, partition, first, frame))
        first += count
    return specs


def spec_config(cfg: RunConfig, spec: SourceSpec) -> RunConfig:
    """The run config one source is prepared under: its data and partition in place of the run's."""
    return dataclasses.replace(cfg, data=spec.data, partition=spec.partition)


def federation_size(cfg: RunConfig) -> int:
    """How many clients the run has: the entries' clients with data.clients, else partition.num_clients."""
    specs = source_specs(cfg)
    return sum(s.clients for s in specs) if specs else cfg.partition.num_clients


def client_tasks(cfg: RunConfig) -> list[str] | None:
    """Each client's task name, by federation-wide id; None for a one-source run."""
    specs = source_specs(cfg)
    return [s.name for s in specs for _ in range(s.clients)] if specs else None


def spec_of_client(cfg: RunConfig, cid: int) -> SourceSpec:
    """The entry whose clients include federation-wide client `cid`."""
    for spec in source_specs(cfg):
        if spec.first_client <= cid < spec.first_client + spec.clients:
            return spec
    raise ConfigError(f"client {cid} is outside the {federation_size(cfg)} clients of data.clients")


def own_source_config(cfg: RunConfig, cid: int, path: str) -> RunConfig:
    """The config a site that holds its own file prepares client `cid`'s data with: that client's
    entry (its target, columns, task) read from `path`, all of it one client."""
    data = cfg.data
    if is_multi_source(cfg):
        data = spec_of_client(cfg, cid).data
    data = dataclasses.replace(data, source=path, clients=None)
    return dataclasses.replace(cfg, data=data, partition=dataclasses.replace(cfg.partition, num_clients=1,
                                                                             scheme="iid"))

