"""The Flower run's directory: the simulator's layout, a checkpoint after every round, and resume.

`output-dir` (run config; a path on the SuperLink's host) is a run directory like `fedlora run`'s:

    config.yaml       the resolved config, written when the run starts
    checkpoints/      round-NNNN/ after every round (fl/checkpoint.py: atomic, SHA-256 checked;
                      with fl.checkpoint, the default), the newest fl.keep_checkpoints kept
    summary.json      at the end, as the simulator writes it (experiment.write_results), and
    plots/            the round curves, and
    adapters/global/  the final global adapter as a PEFT folder with fedlora.json and its card,
                      whose data section says only what the server knows (model/card.py)
    metrics.jsonl     written last, atomically: its presence means the run is complete
                      (`LocalDeployment.run_app` waits on it)

Resume (`resume=true` in the run config) is a *new* Flower run over the same output-dir: the
ServerApp loads the newest good checkpoint, checks that it was written with this config, and
continues with the round after it. A new Flower run gives every SuperNode an empty
`context.state`, so methods whose nodes keep personal state there (FedSA-LoRA's B, FedTreeLoRA's
lambdas, local) cannot resume and are refused; FLoRA's nodes are sent the whole merged delta.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.experiment import check_checkpoint_config, write_config, write_results
from fedlora.fl.checkpoint import Checkpoint, CheckpointError, checkpoint_rounds, load_latest, save_checkpoint
from fedlora.jsonio import jsonl_lines
from fedlora.model.card import nodes_data_description

log = logging.getLogger("fedlora")

ERROR_FILE = "error.txt"
"""Written by the ServerApp when it fails; the launcher stops waiting when it appears."""


def open_run_dir(folder: Path, cfg: RunConfig, resume: bool) -> Checkpoint | None:
    """Start the run directory, or (resume) the checkpoint to continue from. A folder that holds a
    run already is never overwritten by a fresh start: resume it or choose another output-dir."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR_FILE).unlink(missing_ok=True)  # a previous attempt's failure, not this run's
    if resume:
        ckpt = load_latest(folder / "checkpoints")
        check_checkpoint_config(ckpt, cfg, "the run config")
        log.info("fedlora: resuming %s after round %d of %d", folder, ckpt.round, cfg.fl.rounds)
        return ckpt
    if checkpoint_rounds(folder / "checkpoints") or (folder / "metrics.jsonl").exists():
        raise CheckpointError(f"{folder} holds a fedlora run already; continue it with resume=true "
                              "(`flwr run APP CONNECTION --run-config 'resume=true'`) or pass another output-dir")
    write_config(folder, cfg)
    return None


def checkpoint_round(folder: Path, coord) -> Path:
    """The Coordinator's state after its last round, its rows so far, and who wrote them."""
    cfg = coord.cfg
    return save_checkpoint(folder / "checkpoints", coord.state.round, coord.checkpoint_fields(), coord.rows,
                           coord.checkpoint_info(), keep=cfg.fl.keep_checkpoints)


def finish_run_dir(folder: Path, coord, wall_seconds: float) -> dict:
    """summary.json, plots and adapters/ as the simulator writes them, then metrics.jsonl; the summary."""
    data = nodes_data_description(coord.cfg, coord.num_clients)
    summary = write_results(folder, coord, coord.method, coord.state, coord.rows, wall_seconds,
                            coord.dp_summary(), data=data, adapters=not coord.method.personalized)
    tmp = folder / "metrics.jsonl.tmp"  # renamed when complete: its presence means 'done'
    tmp.write_text(jsonl_lines(coord.rows), encoding="utf-8")  # strict JSON: NaN is null
    tmp.replace(folder / "metrics.jsonl")
    return summary
