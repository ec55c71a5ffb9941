"""Learning rate (and, for one-cycle, Adam's beta1) as a pure function of the optimizer step: no hidden scheduler
state to checkpoint, and a resumed run gets exactly the values of an uninterrupted one."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0,
          pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
          decay_fraction: float = 0.2) -> float:
    """LR for optimizer step ``step`` (0-based).

    ``linear`` / ``cosine`` / ``constant``: linear warmup from 0 over ``warmup_steps`` (step 0 gets lr/warmup), then
    linear or cosine decay to ``min_lr_ratio * lr`` at ``max_steps``, or constant.
    ``wsd`` (warmup-stable-decay): the same warmup, ``lr`` held until the last ``decay_fraction`` of ``max_steps``
    (from step ``max_steps - round(decay_fraction * max_steps)`` on), then linear decay to ``min_lr_ratio * lr`` at
    ``max_steps``.
    ``onecycle``: :func:`onecycle_at` (its own warm-up; ``warmup_steps`` and ``min_lr_ratio`` are not used)."""
    if schedule == "onecycle":
        return onecycle_at(step, lr=lr, max_steps=max_steps, pct_start=pct_start, div_factor=div_factor,
                           final_div_factor=final_div_factor)[0]
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_start = warmup_steps  # wsd: the linear decay, started late
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
    progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
    if schedule in ("linear", "wsd"):
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule '{schedule}'; choose linear, cosine, constant, wsd or onecycle")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def onecycle_at(step: int, *, lr: float, max_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                final_div_factor: float = 1e4, max_momentum: float = 0.95,
                base_momentum: float = 0.85) -> tuple[float, float]:
    """(LR, momentum) of the one-cycle policy at optimizer step ``step`` (0-based), Smith & Topin 2017
    ("Super-Convergence", arXiv:1708.07120), with the step semantics of ``torch.optim.lr_scheduler.OneCycleLR``
    (``anneal_strategy='cos'``, ``three_phase=False``, ``total_steps=max_steps``):

    * phase 1, steps 0 .. pct_start·max_steps − 1: LR rises from lr/div_factor to lr, momentum falls from
      ``max_momentum`` to ``base_momentum`` (cosine);
    * phase 2, up to step max_steps − 1: LR anneals to lr/(div_factor·final_div_factor), momentum rises back to
      ``max_momentum`` (cosine).

    With Adam the momentum is beta1 (what OneCycleLR cycles for optimizers with ``betas``)."""
    initial = lr / div_factor
    phases = (  # (end step, start lr, end lr, start momentum, end momentum), as torch's _schedule_phases
        (pct_start * max_steps - 1, initial, lr, max_momentum, base_momentum),
        (max_steps - 1, lr, initial / final_div_factor, base_momentum, max_momentum),
    )
    start_step = 0.0
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            # a phase of zero length (pct_start·max_steps = 1) is already at its end
            pct = (step - start_step) / (end_step - start_step) if end_step != start_step else 1.0
            return _cos_anneal(lr0, lr1, pct), _cos_anneal(m0, m1, pct)
        start_step = end_step
    raise AssertionError("unreachable")


def lr_for(train_cfg, step: int) -> float:
    """``lr_at`` with the settings of a :class:`~pretrain.config.TrainConfig`."""
    return lr_at(
        step, lr=train_cfg.lr, max_steps=train_cfg.max_steps, warmup_steps=train_cfg.warmup_steps,
        schedule=train_cfg.schedule, min_lr_ratio=train_cfg.min_lr_ratio, pct_start=train_cfg.onecycle_pct_start,
        div_factor=train_cfg.onecycle_div_factor, final_div_factor=train_cfg.onecycle_final_div_factor,
        decay_fraction=train_cfg.wsd_decay_fraction,
    )


def momentum_for(train_cfg, step: int) -> float | None:
    """Adam's beta1 for ``step`` under one-cycle (cycled inversely to the LR); None for the other schedules, which
    keep ``train.adam_beta1``."""
    if train_cfg.schedule != "onecycle":
        return None
    return onecycle_at(
        step, lr=train_cfg.lr, max_steps=train_cfg.max_steps, pct_start=train_cfg.onecycle_pct_start,
        div_factor=train_cfg.onecycle_div_factor, final_div_factor=train_cfg.onecycle_final_div_factor,
        max_momentum=train_cfg.onecycle_max_momentum, base_momentum=train_cfg.onecycle_base_momentum,
    )[1]


def apply_schedule(optimizer, train_cfg, step: int) -> float:
    """Set every param group's LR for ``step`` (and Adam's beta1 under one-cycle); returns the LR."""
    lr = lr_for(train_cfg, step)
    set_lr(optimizer, lr, momentum_for(train_cfg, step))
    return lr


def set_lr(optimizer, lr: float, beta1: float | None = None) -> None:
    """Set every param group's LR (and Adam's beta1 unless None: one-cycle cycles it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if beta1 is not None:
            group["betas"] = (beta1, *group["betas"][1:])
