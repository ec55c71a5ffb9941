"""The fast path (``model.fast``, DESIGN.md §6): static shapes and compiled encoders, same parameters as HF.

What it changes, and what it keeps:

* The objective gathers the predicted positions into a fixed number of rows (``Objective.static_shapes``: M = batch
  x the masking's per-block bound, from ``torch.nonzero_static``; padding rows have target -100 and add nothing),
  so the step has no data-dependent shapes and no host sync. This needs a static masked count:
  ``objective.mlm.static_count: true`` (as BERT's reference data pipeline, which masks round(0.15 n) tokens per
  sequence), SpanBERT's exact budget or ELECTRA's static count. Bernoulli MLM keeps dynamic shapes (a warning says so).
* Each transformer stack (``bert``, or the generator's and discriminator's ``electra``) is compiled in place with
  ``nn.Module.compile``: parameter names, checkpoints and exports are exactly those of the eager model.
* SDPA attention, fused AdamW on CUDA and bf16 (``train.precision``) are the trainer's defaults anyway.

The decoupled runtimes (``decouple.mode`` local/synthetic) do not use it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def fast_enabled(model_cfg, device: torch.device) -> bool:
    """``model.fast``, with null meaning "on when the model trains on a CUDA device"."""
    return device.type == "cuda" if model_cfg.fast is None else bool(model_cfg.fast)


def transformer_stacks(model: nn.Module) -> list[nn.Module]:
    """The encoders to compile: ``model.bert`` (BERT) or ``generator.electra`` and ``discriminator.electra``."""
    if hasattr(model, "bert"):
        return [model.bert]
    if hasattr(model, "generator") and hasattr(model, "discriminator"):
        return [model.generator.electra, model.discriminator.electra]
    raise TypeError(f"the fast path does not know the encoder of {type(model).__name__}")


def apply_fast_path(model: nn.Module, objective: nn.Module, block_size: int) -> None:
    """Switch ``objective`` to static shapes and compile ``model``'s transformer stacks in place (no new
    parameters, no renamed ones)."""
    objective.static_shapes = True
    if objective.max_selected(block_size) is None:
        log.warning("model.fast: the masked count varies per batch (objective.mlm.static_count is false), so the "
                    "prediction head keeps data-dependent shapes; set objective.mlm.static_count: true for static ones")
    for stack in transformer_stacks(model):
        stack.compile(dynamic=False)
