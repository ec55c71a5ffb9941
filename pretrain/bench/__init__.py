"""Benchmark suites (``python scripts/benchmark.py SUITE``, ``python -m pretrain.bench SUITE``): each measures the
trainer's own step (``pretrain.steps``) against a baseline in the same process and reports the ratio."""
