"""End-to-end backpropagation (``decouple.mode: none``) under accelerate: DDP over processes, mixed precision,
token-exact gradient accumulation, clipping, a finite check before every update, continued pretraining with EWC,
and the fast path's compiled step. Checkpoints (model, optimizer, scaler, EWC's F and θ*, RNG of every process,
the loop's state) are written, verified and read by :mod:`pretrain.checkpoint`, without pickle.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.stream import to_device, validation_loader
from ..ewc import prepare_continued
from ..fast import apply_fast_path, compile_errors_explained, compile_step, fast_enabled
from ..hf_io import unwrap
from ..metrics import MetricTracker
from ..optim import build_optimizer, step_if_finite
from ..probe import build_probe, probe_layers
from ..schedules import momentum_for, set_lr
from .base import LaunchError, StepStrategy, launched_processes


class PretrainModule(nn.Module):
    """Holds the trained model(s) and the objective (with its own heads) so one optimizer, one DDP wrapper and one
    checkpoint cover both. ``forward(batch, normalizers)`` is the objective's loss dict."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch, normalizers=None):
        return self.objective(self.model, batch, normalizers)


def accumulate_gradients(module, collator, micro_batches: list[dict], accelerator) -> list[dict]:
    """Forward/backward every micro-batch of one optimizer step; returns their output dicts.

    Token-exact: each loss part is normalised by its target count summed over the whole window and all processes.
    DDP averages gradients over processes, so the normalisers are divided by the world size: the resulting gradient
    is sum(losses) / global count, exactly the gradient of one big batch.

    No host sync: the micro-batches are copied to the device without blocking (page-locked when the DataLoader pins
    them) and counted there; a blocking copy of the counts would wait for the previous step's kernels."""
    micro_batches = [to_device(b, accelerator.device) for b in micro_batches]
    counts = collator.window_counts(micro_batches)
    names = sorted(counts)
    totals = torch.stack([counts[k] for k in names])
    world = accelerator.num_processes
    if world > 1:
        totals = accelerator.reduce(totals, "sum")
    normalizers = {k: totals[i] / world for i, k in enumerate(names)}
    outs = []
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with (nullcontext() if sync else accelerator.no_sync(module)), accelerator.autocast():
            out = module(batch, normalizers)
        accelerator.backward(out["loss"])
        outs.append(out)
    return outs


class BackpropStep(StepStrategy):
    """One accelerate process per device; every process holds the whole model (DDP when there are several)."""

    probe = None  #: the linear probes of each evaluation (``build``; ``train.probe``)

    def __init__(self, cfg):
        from accelerate import Accelerator

        self.cfg = cfg
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
        cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()  # several CPU processes: gloo DDP
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
        a = self.accelerator
        launched = launched_processes()
        if a.num_processes != launched:  # never N independent single-process runs in one output_dir
            raise LaunchError(f"{launched} processes were launched but accelerate formed a group of "
                               f"{a.num_processes}; launch with torchrun --nproc_per_node N (gloo on CPU)")
        self.device = a.device
        self.world_size = self.replicas = a.num_processes
        self.replica_index = a.process_index
        self.grad_accum, self.micro_batch_size = cfg.train.grad_accum, cfg.train.micro_batch_size
        self.is_main = self.is_logger = a.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def build(self, objective, collator, out_dir: Path | None, tokenizer) -> nn.Module:
        cfg = self.cfg
        model = objective.build_model(cfg.model)
        fast = fast_enabled(cfg.model, self.device)
        if fast:  # static shapes, fused encoders (pretrain/fast.py); the step is compiled once wrapped
            apply_fast_path(model, objective, cfg.data.block_size)
        self.prepare(model, objective, collator, out_dir, tokenizer, compile=fast)
        self.probe = self.main_first(lambda: build_probe(cfg, objective, tokenizer, self.device))
        return model

    def prepare(self, model: nn.Module, objective, collator, out_dir: Path | None = None, tokenizer=None,
                compile: bool = False) -> None:
        """The step around an already built ``model`` (``build``; benchmarks apply the fast path's levers one by
        one): continued-pretraining weights and EWC (``train.ewc``; F and θ* cached in ``out_dir``), AdamW,
        accelerate's wrapping, and ``compile`` the wrapped step (``pretrain.fast.compile_step``)."""
        a = self.accelerator
        self.collator = collator
        module = PretrainModule(model, objective)
        self.ewc = prepare_continued(self.cfg, module, tokenizer, out_dir, a)  # source weights; F, θ* for λ > 0
        optimizer = build_optimizer(module, self.cfg.train, a.device.type)
        self.module, self.optimizer = a.prepare(module, optimizer)
        if compile:
            compile_step(self.module)
        self.tracker = MetricTracker({**objective.metric_counts, "ewc_penalty": "n_steps"})
        self.skipped = torch.zeros((), device=a.device)  # updates skipped on a non-finite norm (on the device)
        self.grad_norm = torch.zeros((), device=a.device)
        self.module.train()

    def train_step(self, micro_batches: list[dict], lr: float, step: int) -> None:
        t, a = self.cfg.train, self.accelerator
        set_lr(self.optimizer, lr, momentum_for(t, step))  # Adam's beta1 changes under one-cycle only
        with compile_errors_explained():
            outs = accumulate_gradients(self.module, self.collator, micro_batches, a)
        for out in outs:
            self.tracker.add(out)
        step_metrics = {"n_steps": torch.ones((), device=a.device)}
        if self.ewc is not None:  # once per step, onto the window's reduced gradients (the same on every process)
            step_metrics["ewc_penalty"] = self.ewc.add_gradient(unwrap(self.module))
        if t.clip_grad_norm > 0:
            grad_norm = a.clip_grad_norm_(self.module.parameters(), t.clip_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.module.parameters() if p.grad is not None]))
        # never step on a NaN/Inf (fp16 leaves that to the grad scaler, which must also see the overflow);
        # gradients are already all-reduced, so every process takes the same decision
        if t.precision == "fp16":
            self.optimizer.step()
        else:
            self.skipped = self.skipped + step_if_finite(self.optimizer, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = grad_norm
        self.tracker.add(step_metrics)

    def window_metrics(self) -> dict[str, float] | None:
        reduce = (lambda x: self.accelerator.reduce(x, "sum")) if self.world_size > 1 else None
        metrics = self.tracker.compute(reduce=reduce)
        self.tracker.reset()
        metrics.pop("n_steps", None)
        metrics.update(grad_norm=float(self.grad_norm), skipped_steps=int(self.skipped))
        return metrics  # the same on every process

    @torch.no_grad()
    def evaluate(self, val_blocks) -> dict[str, float] | None:
        a = self.accelerator
        loader = validation_loader(val_blocks, self.collator.collate, self.cfg.train, a.num_processes,
                                   a.process_index)
        tracker = MetricTracker(self.collator.metric_counts)
        self.module.eval()
        for batch in loader:
            with a.autocast():
                tracker.add(self.module(to_device(batch, a.device)))
        if len(loader) == 0:  # fewer validation blocks than processes: this one adds zeros under the metrics' names,
            # so that every process takes part in the same reduction
            batch = next(iter(validation_loader(val_blocks, self.collator.collate, self.cfg.train, 1, 0)))
            with a.autocast():
                tracker.add({k: torch.zeros_like(v) for k, v in self.module(to_device(batch, a.device)).items()})
        metrics = tracker.compute(reduce=lambda x: a.reduce(x, "sum"))  # the same on every process
        if self.probe is not None:  # every replica holds the same weights and texts: each fits a share of the layers
            module = unwrap(self.module)
            scores = probe_layers(self.probe, module.objective, module.model, self.cfg.train.probe.layers,
                                  share=(a.process_index, a.num_processes))
            scores = {k: v for part in gather_object([scores]) for k, v in part.items()}  # 1 process: [scores]
            metrics.update(sorted(scores.items(), key=lambda kv: int(kv[0].removeprefix("probe_acc_layer"))))
        self.module.train()
        return metrics

    def save(self, root: Path, step: int, state: dict, keep_last: int) -> Path:
        return save_checkpoint(self.accelerator, root, step, state, keep_last, self.module, self.optimizer,
                               self._extras())

    def load(self, path: Path) -> dict:
        return load_checkpoint(self.accelerator, path, self.module, self.optimizer, self._extras())

    def _extras(self) -> list:
        """What every checkpoint carries beside model and optimizer: EWC's F and θ*."""
        return [self.ewc] if self.ewc is not None else []

    def export_model(self, checkpoint: Path) -> tuple[nn.Module, dict] | None:
        return (unwrap(self.module).model, {}) if self.is_logger else None

    def close(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
