"""One chunk's training state: parameters, optimizer, grad scaler, dropout RNG, metrics and checkpoint files."""

from __future__ import annotations

import collections
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_tensors, loading
from ..config import Config
from ..metrics import MetricTracker
from ..optim import build_optimizer, step_if_finite
from ..schedules import set_lr
from .chunks import ChunkedModel


class ChunkRNG:
    """A private RNG stream (CPU, and the current CUDA device if any) for one chunk's dropout: swapped into the
    global generators while the chunk runs, so the masks do not depend on which process runs which chunk."""

    def __init__(self, seed: int, chunk: int, device: torch.device, replica: int = 0):
        self.device = device
        entropy = [int(seed) & 0xFFFFFFFF, 0xDEC0, chunk] + ([replica] if replica else [])  # replicas: own masks
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = None
        if device.type == "cuda":
            self.cuda = torch.Generator(device=device).manual_seed(seed).get_state()

    @contextmanager
    def active(self):
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(saved_cuda, self.device)

    def state_dict(self) -> dict:
        return {"cpu": self.cpu, "cuda": self.cuda.cpu() if self.cuda is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.cpu = state["cpu"]
        if self.cuda is not None and state.get("cuda") is not None:
            self.cuda = state["cuda"]


class Stage:
    """Everything one chunk needs to train: its parameters, optimizer (AdamW, train.* hyperparameters), grad scaler
    (fp16), dropout RNG and metric tracker; the stage of ``decouple.mode: local``, and the base of every mode's.
    Chunks 0..K-2 of ``decouple.freeze_lower`` (the frozen-random control) run forward only (``frozen``).

    What a mode may add: modules of the non-final chunks, asked for when the model is cut (:meth:`aux_heads`: local
    losses, here the objective's auxiliary heads; :meth:`boundary_modules`: e.g. synthetic-gradient modules), and,
    through hooks the pipeline calls on every stage (no-ops here), messages sent down to the chunk below (``outbox``: gradients of this chunk's input, in micro-batch order; :meth:`messages_down` bounds
    them in flight), micro-batches waiting for the chunk above's reply (``pending``, of which :meth:`due` must be
    answered now through :meth:`resolve`), :meth:`begin_window` (whether the window drains) and
    :meth:`release_graphs` before the update (synthetic mode, ``synthetic.py``)."""

    def __init__(self, model: ChunkedModel, k: int, cfg: Config, device: torch.device, replica: int = 0):
        frozen = cfg.decouple.freeze_lower and k < cfg.decouple.chunks - 1
        self.k, self.model, self.chunk, self.frozen = k, model, model.chunks[k], frozen
        self.params = model.chunk_parameters(k)
        self.optimizer = None if frozen else build_optimizer(nn.ParameterList(self.params), cfg.train, device.type)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" and not frozen else None
        self.rng = ChunkRNG(cfg.train.seed, k, device, replica)
        self.tracker = MetricTracker(self.chunk.metric_counts)
        self.skipped = 0
        self.grad_norm = torch.zeros((), device=device)
        self.outbox: collections.deque[torch.Tensor] = collections.deque()
        self.pending: collections.deque = collections.deque()

    #: the split-protocol members of ``objectives.base.Objective`` this mode needs the objective to provide
    requires = ("split_config", "layers", "layer_runner", "stem", "final_head", "aux_head")
    #: why, in words, named when an objective does not provide them
    needs = ""

    @staticmethod
    def aux_heads(objective, model: nn.Module, config, decouple_cfg) -> list[nn.Module]:
        """The heads of chunks 0..K-2 (their local losses): ``objective.aux_head`` each, with the extra transformer
        layer of ``decouple.aux_head: layer``."""
        extra = decouple_cfg.aux_head == "layer"
        return [objective.aux_head(config, extra) for _ in range(decouple_cfg.chunks - 1)]

    @staticmethod
    def boundary_modules(objective, model: nn.Module, config, decouple_cfg) -> list[nn.Module]:
        """Modules at the K-1 boundaries, outside every chunk's parameters (``ChunkedModel.synthetic``)."""
        return []

    @staticmethod
    def messages_down(cfg: Config) -> int:
        """Sends to the chunk below that may be in flight at once (beyond the activations going up)."""
        return 0

    def begin_window(self, step: int | None) -> bool:
        """Called before optimizer step ``step``'s micro-batches (None: outside the trainer's loop); True: the window
        must wait for every reply it started before the update."""
        return False

    def due(self) -> int:
        """How many ``pending`` micro-batches must be resolved now."""
        return 0

    def release_graphs(self) -> None:
        """Before the update: finish the micro-batches still waiting for a reply."""

    def forward_backward(self, batch, inputs, normalizers, autocast) -> dict[str, torch.Tensor]:
        """One micro-batch: forward the chunk on ``inputs`` (detached inside the chunk), backward its own loss."""
        with self.rng.active():
            if self.frozen:
                with torch.no_grad(), autocast():
                    outputs, _ = self.chunk(batch, inputs, normalizers, with_head=False)
                return outputs
            with autocast():
                outputs, out = self.chunk(batch, inputs, normalizers)
            loss = out["loss"]
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.tracker.add(out)
        return outputs

    def update(self, lr: float, clip: float, beta1: float | None = None) -> None:
        """Clip this chunk's gradients, skip its update on a non-finite norm, step, zero the gradients. ``beta1``:
        Adam's beta1 for this step (one-cycle), None = unchanged."""
        if self.frozen:
            return
        set_lr(self.optimizer, lr, beta1)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p for p in self.params if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads]))
        self.grad_norm = norm.detach()
        if self.scaler is not None:  # the scaler skips non-finite steps itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif step_if_finite(self.optimizer, norm):
            self.skipped += 1
            print(f"chunk {self.k}: non-finite gradient norm, skipping its update", flush=True)
        self.optimizer.zero_grad(set_to_none=True)

    def sum_gradients(self, reduce) -> None:
        """Data-parallel pipelines: sum this chunk's gradients over its replicas with ``reduce`` (one flat
        all-reduce). Every replica's loss is normalised by the global window count, so the sum is the global
        batch's gradient."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.frozen or not grads:
            return
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def window_metrics(self, reduce=None) -> dict[str, float]:
        """The logging window's metrics (``reduce``: sums the tracker's totals over the replicas)."""
        metrics = self.tracker.compute(reduce)
        self.tracker.reset()
        if not self.frozen:
            metrics[f"chunk{self.k}_grad_norm"] = float(self.grad_norm)
            metrics[f"chunk{self.k}_skipped_steps"] = self.skipped
        return metrics

    # checkpoint files of this chunk: checkpoints/step-N/chunk{k}/
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.chunk_state_dict(self.k).items()}
        save_file(tensors, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "rng": self.rng.state_dict(), "skipped": self.skipped}, directory / "state.pt")

    def load(self, directory: Path) -> None:
        """Restore this chunk from ``directory`` (``checkpoints/step-N/chunk{k}``, verified by the pipeline);
        ``state.pt`` is read with ``weights_only=True``. Any failure is a CheckpointError naming the file."""
        from safetensors.torch import load_file

        path, weights = directory.parent, directory / "model.safetensors"
        with loading(path, weights):
            self.model.load_chunk_state_dict(self.k, load_file(str(weights)))
        state = load_tensors(path, directory / "state.pt")
        with loading(path, directory / "state.pt"):
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.rng.load_state_dict(state["rng"])
            self.skipped = state["skipped"]
