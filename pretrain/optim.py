"""Optimizer helpers shared by every step strategy (a leaf): AdamW with decay on matrices only, and a step that
is skipped on a non-finite gradient norm."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(module: nn.Module, train_cfg, device_type: str) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (p.dim() >= 2): never on biases or LayerNorm weights."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), eps=train_cfg.adam_eps,
        fused=device_type == "cuda" or None,
    )


def step_if_finite(optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """``optimizer.step()`` unless ``grad_norm`` is NaN/Inf; returns 1.0 where the update was skipped, else 0.0 (a
    0-dim tensor on the gradients' device). A fused AdamW takes the decision on the device (its ``found_inf`` input,
    as under a grad scaler: parameters, moments and step counts stay untouched) with no host sync; other optimizers
    read the flag on the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    skipped = (~torch.isfinite(grad_norm)).float()
    if inner.defaults.get("fused"):
        inner.found_inf = skipped
        optimizer.step()
        inner.found_inf = None
    elif not skipped.item():
        optimizer.step()
    return skipped

