"""The run config Flower carries, and how a SuperNode's node config selects its data.

The fedlora YAML travels whole, as one string value of Flower's run config (`fedlora-config`),
so the SuperLink's ServerApp and every SuperNode's ClientApp parse the very same `RunConfig`
the simulator would. Flower run config values are TOML scalars, hence a string.

Node config (`flower-supernode --node-config "..."`), one of:
  partition-id=i num-partitions=N   client i of the config's own partition (built-in data; demos,
                                    and the equality test against the simulator)
  partition-id=i data-path="x.csv"  this site's own table; it is all of this client's data
                                    (split into train/val/test by the config's fractions; the
                                    data.global_test_fraction share is held out and unused, since
                                    prepare() cannot yet encode an empty global test set)
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from fedlora.config import RunConfig, apply_overrides, from_dict, validate

CONFIG_KEY = "fedlora-config"
OUTPUT_KEY = "output-dir"
TIMEOUT_KEY = "round-timeout"
MIN_NODES_KEY = "min-nodes"
RESUME_KEY = "resume"
"""true: continue the run in output-dir from its newest good checkpoint (flower/rundir.py)."""


def config_to_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_text(text: str, overrides: list[str] | None = None) -> RunConfig:
    cfg = from_dict(RunConfig, apply_overrides(yaml.safe_load(text) or {}, overrides or []))
    validate(cfg)
    return cfg


def run_config_of(run_config: Mapping[str, object]) -> RunConfig:
    text = run_config.get(CONFIG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the Flower run config has no {CONFIG_KEY!r}: build the app with "
                         "`fedlora flower app CONFIG --out DIR`")
    return config_from_text(text)


def node_selection(node_config: Mapping[str, object], cfg: RunConfig) -> tuple[int, RunConfig]:
    """(client id, the config this node prepares its data with) from its node config."""
    if "partition-id" not in node_config:
        raise ValueError('node config needs partition-id, e.g. --node-config "partition-id=0 num-partitions=3"')
    cid = int(node_config["partition-id"])
    n = cfg.partition.num_clients
    if not 0 <= cid < n:
        raise ValueError(f"partition-id={cid} but the run config has partition.num_clients={n}")
    path = node_config.get("data-path")
    if path:  # this site's own table: one 'partition' holding all of it
        return cid, config_from_text(config_to_text(cfg), [f"data.source={path}", "partition.num_clients=1",
                                                           "partition.scheme=iid"])
    given = node_config.get("num-partitions")
    if given is not None and int(given) != n:
        raise ValueError(f"num-partitions={given} but the run config has partition.num_clients={n}")
    return cid, cfg
