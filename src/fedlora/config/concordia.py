"""The `concordia` section (arXiv 2605.09855; fl/concordia.py, docs/concordia.md).

Kept in its own file so `sections.py` stays readable; `RunConfig.concordia` holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
