"""Progress display, summaries, comparison tables and plots."""
