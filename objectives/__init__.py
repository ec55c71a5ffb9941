"""Pretraining objectives: ``get_objective(name, tokenizer=tok, **options)``.

Each objective is a pure ``nn.Module``: ``collate(examples)`` masks on the CPU, ``build_model(model_config)`` creates
the stock ``transformers`` model(s), ``obj(model, batch)`` returns a dict with ``loss`` and named parts.
"""

from __future__ import annotations

import difflib
import importlib

from .base import IGNORE_INDEX, Objective

#: objective name -> (module, class); modules are imported on demand
OBJECTIVES = {
    "mlm": ("objectives.mlm", "MLMObjective"),
    "span": ("objectives.span", "SpanObjective"),
    "electra": ("objectives.electra", "ElectraObjective"),
}


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown objective '{name}'{hint}; choose one of: {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name]
    return getattr(importlib.import_module(module), cls)


def get_objective(name: str, tokenizer, seed: int = 0, **options) -> Objective:
    """Build objective ``name`` for ``tokenizer``; ``options`` are the fields of its config dataclass."""
    return objective_class(name)(tokenizer, seed=seed, **options)


__all__ = ["IGNORE_INDEX", "OBJECTIVES", "Objective", "get_objective", "objective_class"]
