"""Concordia's parts (arXiv 2605.09855): table generator, GRPO, utility scorers, table quality."""
