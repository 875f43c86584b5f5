"""The engine's side of CuMA (fl/methods/cuma.py): the layer on the shared model, and every row's profile.

Methods never touch the model, so the simulator calls `sync_cuma(fed, method, seed)` when it is
built and when it runs: for a method with `model_layer = "cuma"` it attaches CuMA's experts and
routers (model/cuma.py) to the Federation's model, sets the balance term to ride on the task
loss (the shared training loop back-propagates only that), and installs a lookup from each
row's prompt ids to its profile embedding z; for any other method it removes CuMA. It returns
the initial tensors of experts 1..N-1, routers and projection ({} without CuMA), which join the
LoRA initial state.

Profiles (`cuma.profile_source`):
- 'columns': a row's profile text is its `cuma.profile_columns` values ('age_band: 25-35; ...'),
  read from the table rows of each client split and of the global test;
- 'client': each client is one group, profile text `cuma.client_profile` with its id (ours).
z is the frozen base's mean-pooled hidden state of the text (model/cuma_io.ProfileEncoder).
Prompts whose rows the Federation does not keep (shifted test, holdout, content-free calibration
prompts), and the global test under 'client', get the mean z of all profiles (ours).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from fedlora.config import ConfigError
from fedlora.fl.methods.cuma import ROUTING_MASS
from fedlora.model.cuma import (
    attach_cuma,
    cuma_controller,
    detach_cuma,
    set_profile_lookup,
)
from fedlora.model.cuma_io import ProfileEncoder, PromptProfiles, profile_text
from fedlora.model.lora import adapter_state

log = logging.getLogger("fedlora")


def sync_cuma(fed, method, seed: int, fresh: bool = True,
              client_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Attach (method uses CuMA) or remove CuMA on `fed.model`; CuMA's initial tensors, or {}.

    `fresh=False` keeps a CuMA layer already attached with the same config (a run continuing).
    `client_ids`: the federation-wide id of each of `fed.clients` (a Flower node with its own
    table is client 0 of its own federation but partition i of the run; 'client' profiles name i)."""
    model, cfg = fed.model, fed.cfg
    if getattr(method, "model_layer", None) != "cuma":
        detach_cuma(model)
        return {}
    if cfg.data.task == "generation":
        raise ConfigError("fl.method=cuma does not run on data.task=generation yet (its profile lookup keys "
                          "classification prompts); pick another method for a generation task")
    ctl = cuma_controller(model)
    if fresh or ctl is None or ctl.cfg != cfg.cuma:
        ctl = attach_cuma(model, cfg.cuma, seed=seed)
        ctl.aux_mode, ctl.aux_batch = "inject", cfg.train.batch_size
        if cfg.cuma.use_profile and cfg.cuma.experts > 1:
            set_profile_lookup(model, _cached_profiles(fed, client_ids))
    return {k: v for k, v in adapter_state(model).items() if "cuma_" in k}


def _cached_profiles(fed, client_ids: list[int] | None = None) -> PromptProfiles:
    """One lookup per Federation and profile setting: encoding every row's profile is the slow part."""
    cuma = fed.cfg.cuma
    ids = list(client_ids) if client_ids is not None else list(range(len(fed.clients)))
    key = (cuma.profile_source, tuple(cuma.profile_columns), cuma.client_profile, tuple(ids))
    cache = fed.__dict__.setdefault("_cuma_profiles", {})
    if key not in cache:
        cache[key] = _profiles(fed, ids)
    return cache[key]


def _profiles(fed, client_ids: list[int]) -> PromptProfiles:
    cuma = fed.cfg.cuma
    source, columns = cuma.profile_source, list(cuma.profile_columns)
    if source == "columns" and not columns:
        log.warning("cuma: cuma.profile_columns is empty; each client is one group (cuma.profile_source=client)")
        source = "client"
    frame = fed.table.frame
    missing = [c for c in columns if c not in frame.columns]
    if source == "columns" and missing:
        raise ConfigError(f"cuma.profile_columns: {missing} not in the table; its columns are "
                          f"{', '.join(map(str, frame.columns))}")
    encoder = ProfileEncoder(fed.model, fed.tokenizer)

    def texts(rows, cid):
        if source == "client":
            return [cuma.client_profile.format(client=cid)] * len(rows)
        return [profile_text(frame.iloc[int(r)], columns) for r in rows]

    parts = []  # (prompt ids, profile texts)
    for cid, client in zip(client_ids, fed.clients):
        for split in ("train", "val", "test"):
            parts.append((getattr(client, split).prompt_ids, texts(client.rows[split], cid)))
    if source == "columns":
        parts.append((fed.global_test.prompt_ids, texts(fed.global_rows, None)))
    every = sorted({t for _, ts in parts for t in ts})
    verbalizers = getattr(fed.clients[0].train, "verbalizer_ids", ())  # classification: prompt + label tokens
    lookup = PromptProfiles(verbalizers, default=encoder(every).mean(0))
    for prompt_ids, ts in parts:
        if ts:
            lookup.add(prompt_ids, encoder(ts))
    return lookup


@contextmanager
def tracked_routing_mass(model, on: bool):
    """Yields a dict that, when the block ends, holds each routed module's routing mass over the
    block's training forwards: {"routing_mass.<module>": m} with m_e = mean gate of expert e over
    the non-pad tokens of its router (sums to 1; fl/methods/cuma.py weights B_e by n_i m_ie).
    Empty when `on` is false or the model has no CuMA layer."""
    ctl = cuma_controller(model)
    out: dict[str, torch.Tensor] = {}
    if not on or ctl is None:
        yield out
        return
    ctl.mass = {}
    try:
        yield out
    finally:
        mass, ctl.mass = ctl.mass, None
    for module, group in ctl.module_groups.items():
        if group in mass:
            total, tokens = mass[group]
            out[ROUTING_MASS + module] = (total / max(tokens, 1.0)).to(torch.float32)
