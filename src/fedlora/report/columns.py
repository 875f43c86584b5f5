"""Which comparison columns a table has (calibrated, generation): shared by report/summary.py,
report/progress.py and report/html.py so that progress never imports summary (which prints through it)."""

from __future__ import annotations


CALIBRATED_COLUMNS = (("acc cal", "accuracy_cal"), ("macro-F1 cal", "macro_f1_cal"), ("ECE", "ece"),
                      ("ECE cal", "ece_cal"))
"""Columns comparison_markdown adds, for clients and global, when some method was calibrated."""


def calibrated(table: list[dict]) -> bool:
    """Whether any method's row of `comparison` carries calibrated scores."""
    return any((part or {}).get("accuracy_cal", {}).get("count", 0) for row in table
               for part in (row["clients"], row["global"]))


GENERATIVE_COLUMNS = (("ROUGE-L", "rougeL"), ("ROUGE-1", "rouge1"), ("EM", "exact_match"), ("ppl", "perplexity"))
"""comparison_markdown's columns, for clients and global, on a generation task."""


def generative(table: list[dict]) -> bool:
    """Whether `comparison`'s rows are of a generation task."""
    return any("rougeL" in (part or {}) for row in table for part in (row["clients"], row["global"]))
