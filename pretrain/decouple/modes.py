"""The decoupling modes (``decouple.mode``): name -> the per-chunk stage class that trains a chunk in that mode."""

from __future__ import annotations

import importlib

#: mode -> "module:Class" of its stage (imported on demand)
DECOUPLING = {
    "local": "pretrain.decouple.stage:Stage",
    "synthetic": "pretrain.decouple.synthetic:SyntheticStage",
}


def mode_stage(mode: str) -> type:
    """The stage class of decoupling mode ``mode``."""
    module, name = DECOUPLING[mode].split(":")
    return getattr(importlib.import_module(module), name)
