"""What the training loop needs from a way of taking optimizer steps (``pretrain.trainer.fit`` knows no other).

A step strategy owns the processes, the device, the trained modules and their optimizers. The loop asks it, in
this order: ``barrier`` / ``main_first`` (run-directory and data-cache set-up), ``build`` (models, optimizers, fast
path), ``load`` (resume), then per optimizer step ``train_step``, and at its cadences ``window_metrics``,
``evaluate``, ``save``; after step ``switch_at`` (if any) ``switch``; at the end ``export_model`` and ``close``. Methods that produce results may return None on
processes that hold none (a pipeline gathers its metrics on its last process); only ``is_logger`` logs, prints and
exports, so the loop never assumes a collective in log, evaluation or save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class StepStrategy:
    """The surface the loop drives; see the module docstring. Subclasses set, in ``__init__`` (which launches or
    joins the processes): ``device``, ``world_size`` (processes), ``replicas`` (data-parallel copies, D: each reads
    its own share of the stream), ``replica_index``, ``grad_accum`` and ``micro_batch_size`` (this process's
    micro-batches per step and their blocks: a step's global batch is replicas × grad_accum × micro_batch_size
    blocks), ``is_main`` (prepares the run directory and data cache) and ``is_logger`` (logs, prints, exports)."""

    device: torch.device
    world_size: int = 1
    replicas: int = 1
    replica_index: int = 0
    grad_accum: int = 1
    micro_batch_size: int = 1
    is_main: bool = True
    is_logger: bool = True
    #: optimizer step after which the loop calls :meth:`switch` (None: never)
    switch_at: int | None = None

    def barrier(self) -> None:
        """Wait for every process of the launch."""

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main process, then on the others (which find what it cached)."""
        if self.is_main:
            result = fn()
        self.barrier()
        if not self.is_main:
            result = fn()
        return result

    def build(self, objective: nn.Module, collator: nn.Module, out_dir: Path, tokenizer) -> nn.Module:
        """Build the objective's model(s), optimizers and fast path; returns the stock model whose non-embedding
        parameters count for MFU. ``collator``: the CPU copy of ``objective`` that collates (also for evaluation)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Extra fields for the run's start record (metrics.jsonl)."""
        return {}

    def train_step(self, micro_batches: list[dict], lr: float, step: int) -> None:
        """One optimizer step (0-based ``step``) on this process's ``train.grad_accum`` micro-batches at ``lr``."""
        raise NotImplementedError

    def switch(self) -> None:
        """After step ``switch_at``: change how the following steps are taken (``decouple.until_step``: the
        decoupled pipeline hands its model to end-to-end backprop). The global batch stays the same; the share of
        each process (``replicas``, ``replica_index``, ``grad_accum``, ``micro_batch_size``) may change, and the loop
        rebuilds its loader from it."""
        raise NotImplementedError

    def window_metrics(self) -> dict[str, float] | None:
        """Metrics since the last call (reduced over processes), with ``grad_norm`` (of the last step) and
        ``skipped_steps`` (updates skipped on non-finite gradients so far); None where the metrics are not gathered."""
        raise NotImplementedError

    def evaluate(self, val_blocks) -> dict[str, float] | None:
        """Token-exact validation metrics on the fixed validation blocks and masks; None where not gathered."""
        raise NotImplementedError

    def save(self, root: Path, step: int, state: dict, keep_last: int) -> Path:
        """Write and commit checkpoint ``root/step-N`` holding ``state`` (the loop's counters and config)."""
        raise NotImplementedError

    def load(self, path: Path) -> dict:
        """Restore checkpoint ``path`` in place; returns the loop's state saved with it."""
        raise NotImplementedError

    def export_model(self, checkpoint: Path) -> tuple[nn.Module, dict] | None:
        """After training (``checkpoint``: the final one): the stock model to export and the sidecar files to write
        beside it (name -> (tensors, metadata)); None on processes that do not export."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the processes' resources."""


class LaunchError(ValueError):
    """The processes launched are not the ones the launch asked for."""


#: environment variables holding a launch's process count: torchrun/accelerate, then MPI's (accelerate's order)
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """The processes of this launch (torchrun, accelerate's launchers, mpirun). Refuses ``accelerate launch
    --num_processes N`` where accelerate falls back to its single-process launcher (``--cpu``, or no GPUs): it
    starts ONE process (it exports ``MASTER_PORT`` then, no process count), which would be taken for N."""
    env = os.environ
    world = next((int(env[k]) for k in WORLD_SIZE_VARS if k in env), None)
    if world is None and "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env:
        raise LaunchError("accelerate launch --num_processes N started one process, not N (its single-process "
                          "launcher, used with --cpu or without GPUs); for N CPU processes run: "
                          "torchrun --nproc_per_node N scripts/pretrain.py CONFIG (gloo)")
    return world or 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) as accelerate's ``set_seed`` does."""
    from accelerate.utils import set_seed

    set_seed(seed)
