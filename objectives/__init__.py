"""Pretraining objectives: ``get_objective(name, tokenizer=tok, **options)``.

Each objective is a pure ``nn.Module``: ``collate(examples)`` masks on the CPU, ``build_model(model_config)`` creates
the stock ``transformers`` model(s), ``obj(model, batch)`` returns a dict with ``loss`` and named parts.
``OBJECTIVES`` names each objective's class and options dataclass (the config section ``objective.<name>``);
``register_objective`` adds one (e.g. from a test or a plugin module). ``BACKBONES`` names the encoder architectures
(``model.arch``) an objective's model is built on (``objectives.backbones``).
"""

from __future__ import annotations

import difflib
import importlib

from .backbones import BACKBONES, backbone_of
from .base import IGNORE_INDEX, Objective

#: objective name -> (objective class, options dataclass), each a class or a "module:Class" string imported on demand
OBJECTIVES: dict[str, tuple[type | str, type | str]] = {
    "mlm": ("objectives.mlm:MLMObjective", "objectives.mlm:MLMConfig"),
    "span": ("objectives.span:SpanObjective", "objectives.span:SpanConfig"),
    "electra": ("objectives.electra:ElectraObjective", "objectives.electra:ElectraConfig"),
}


def resolve(ref: type | str) -> type:
    """A class, or the class a ``"module:Class"`` string names (its module imported now)."""
    if isinstance(ref, str):
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)
    return ref


def register_objective(name: str, objective_cls: type[Objective] | str, options_cls: type | str) -> None:
    """Make ``objective.name: <name>`` train ``objective_cls`` with the options dataclass ``options_cls`` (the config
    section ``objective.<name>``; its fields are the keyword arguments of ``objective_cls(tokenizer, seed, ...)``).
    The decoupling modes it supports follow from the split protocol members it implements (``objectives.base``)."""
    if not name.isidentifier():
        raise ValueError(f"objective name {name!r} must be an identifier (it is a config key: objective.{name})")
    if name in OBJECTIVES:
        raise ValueError(f"objective '{name}' is already registered; choose another name")
    OBJECTIVES[name] = (objective_cls, options_cls)


def _entry(name: str) -> tuple[type | str, type | str]:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown objective '{name}'{hint}; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_class(name: str) -> type[Objective]:
    return resolve(_entry(name)[0])


def options_class(name: str) -> type:
    """The options dataclass of objective ``name`` (its config section)."""
    return resolve(_entry(name)[1])


def get_objective(name: str, tokenizer, seed: int = 0, **options) -> Objective:
    """Build objective ``name`` for ``tokenizer``; ``options`` are the fields of its config dataclass."""
    return objective_class(name)(tokenizer, seed=seed, **options)


__all__ = ["BACKBONES", "IGNORE_INDEX", "OBJECTIVES", "Objective", "get_objective", "objective_class", "options_class",
           "register_objective", "resolve", "backbone_of"]
