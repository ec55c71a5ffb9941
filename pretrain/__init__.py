"""Encoder pretraining toolkit: config, data, trainer, export (objectives live in the `objectives` package)."""

__version__ = "0.1.0"
