"""Step strategies: how the one training loop (``pretrain.trainer.fit``) takes an optimizer step.

``backprop`` (``decouple.mode: none``): end-to-end backpropagation under accelerate (DDP, mixed precision,
accumulation, EWC). ``decoupled`` (every mode of ``pretrain.decouple.modes.DECOUPLING``): the chunk pipeline with its
own ``torch.distributed`` process layout (DESIGN §4: no DDP on chunks). ``hybrid`` (``decouple.until_step``): the
decoupled pipeline, then backprop of the stitched model (local, then backprop). Benchmarks and the LR range test build their
steps here too, so they measure the very step the trainer runs.
"""

from __future__ import annotations

import importlib

from .base import StepStrategy, launched_processes, seed_everything

#: strategy name -> "module:Class" (imported on demand)
STEPS = {
    "backprop": "pretrain.steps.backprop:BackpropStep",
    "decoupled": "pretrain.steps.decoupled:DecoupledStep",
    "hybrid": "pretrain.steps.hybrid:HybridStep",
}


def step_kind(decouple_mode: str, until_step: int | None = None) -> str:
    """The strategy of ``decouple.mode``: ``backprop`` for none, ``decoupled`` for every decoupling mode, ``hybrid``
    for a decoupling mode that switches to backprop after ``until_step``."""
    if decouple_mode == "none":
        return "backprop"
    return "decoupled" if until_step is None else "hybrid"


def build_step(cfg) -> StepStrategy:
    """The step strategy of ``cfg`` (``decouple.mode``, ``decouple.until_step``), with its processes launched or
    joined."""
    launched_processes()  # refuses a launch that asked for N processes but started one
    module, name = STEPS[step_kind(cfg.decouple.mode, cfg.decouple.until_step)].split(":")
    return getattr(importlib.import_module(module), name)(cfg)


__all__ = ["STEPS", "StepStrategy", "build_step", "seed_everything", "step_kind"]
