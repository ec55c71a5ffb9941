"""Learning rate as a pure function of the optimizer step (no hidden scheduler state to checkpoint)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup from 0 over ``warmup_steps`` (step 0 gets lr/warmup),
    then ``linear`` or ``cosine`` decay to ``min_lr_ratio * lr`` at ``max_steps``, or ``constant``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule '{schedule}'; choose linear, cosine or constant")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def lr_for(train_cfg, step: int) -> float:
    """``lr_at`` with the settings of a :class:`~pretrain.config.TrainConfig`."""
    return lr_at(
        step, lr=train_cfg.lr, max_steps=train_cfg.max_steps, warmup_steps=train_cfg.warmup_steps,
        schedule=train_cfg.schedule, min_lr_ratio=train_cfg.min_lr_ratio,
    )
