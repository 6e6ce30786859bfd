"""Experiment configs: one file per model family, `get_config(size)` in each."""
