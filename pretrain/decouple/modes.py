"""Decoupling modes (``decouple.mode``): name -> options section and per-chunk stage class.

Entries name classes as ``"module:Class"`` strings imported on demand, so the config can read this registry without
importing torch. ``none`` (end-to-end backprop) is not a mode here: it decouples nothing.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    stage: str
    """The per-chunk stage class, ``"module:Class"``."""
    options: str | None = None
    """The options dataclass (config section ``decouple.<mode>``), ``"module:Class"``; None = no section."""


DECOUPLING: dict[str, Mode] = {
    "local": Mode(stage="pretrain.decouple.stage:Stage"),
    "synthetic": Mode(stage="pretrain.decouple.synthetic:SyntheticStage",
                      options="pretrain.decouple.synthetic:SyntheticConfig"),
}


def register_mode(name: str, stage: str, options: str | None = None) -> None:
    """Add decoupling mode ``name``: its per-chunk ``stage`` class and its options dataclass (the section
    ``decouple.<name>``), both ``"module:Class"``."""
    if not name.isidentifier() or name == "none":
        raise ValueError(f"decoupling mode {name!r} must be an identifier other than 'none' (it is a config key)")
    if name in DECOUPLING:
        raise ValueError(f"decoupling mode '{name}' is already registered; choose another name")
    DECOUPLING[name] = Mode(stage=stage, options=options)


def _load(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _mode(name: str) -> Mode:
    if name not in DECOUPLING:
        close = difflib.get_close_matches(name, list(DECOUPLING), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown decoupling mode '{name}'{hint}; choose one of: {', '.join(DECOUPLING)}")
    return DECOUPLING[name]


def options_class(name: str) -> type | None:
    """The options dataclass of mode ``name``, or None when it has no section."""
    ref = _mode(name).options
    return _load(ref) if ref else None


def stage_class(name: str) -> type:
    """The per-chunk stage class of mode ``name``."""
    return _load(_mode(name).stage)


def missing(objective_cls: type, mode: str) -> list[str]:
    """The split-protocol members that decoupling mode ``mode`` needs (its stage's ``requires``) and
    ``objective_cls`` does not provide: a method the class leaves as the base ``Objective``'s, or an attribute
    that is None."""
    from objectives.base import Objective

    return [m for m in stage_class(mode).requires
            if getattr(objective_cls, m, None) is None or getattr(objective_cls, m) is getattr(Objective, m, None)]


def unsupported(objective_cls: type, mode: str) -> str | None:
    """Why ``objective_cls`` cannot be cut for decoupling mode ``mode`` (the message names what the mode needs and
    the modes that work), or None when it can."""
    if not missing(objective_cls, mode):
        return None
    name = getattr(objective_cls, "name", objective_cls.__name__)
    working = [m for m in DECOUPLING if not missing(objective_cls, m)]
    alternatives = " or ".join(f"decouple.mode={m}" for m in working) or "no decoupling"
    return (f"decouple.mode={mode} is not implemented for objective '{name}'{stage_class(mode).needs}; use "
            f"{alternatives} for {name}")
