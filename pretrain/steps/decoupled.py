"""The decoupled pipeline (any ``decouple.mode`` but none) as a step strategy: chunks trained by their own losses
or by synthetic gradients, simulated in one process or one process per chunk (``pretrain/decouple/``).

The processes form their own ``torch.distributed`` group (DESIGN §4: no DDP on chunks; D data-parallel pipelines
sum through per-chunk replica groups). Metrics, evaluation results and "chunk saved" notes flow up to the process
that holds the last chunk of pipeline 0, the only one that logs, commits checkpoints and exports.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..decouple.chunks import ChunkedModel
from ..decouple.layout import init_distributed, pick_device, resolve_layout
from ..decouple.pipeline import Pipeline, window_normalizers
from ..decouple.run import load_chunks, sidecar_files
from ..fast import apply_fast_path_to_chunks, compile_errors_explained, fast_enabled
from ..probe import build_probe
from .base import StepStrategy


class DecoupledStep(StepStrategy):
    """This process's chunks of a K-chunk pipeline (``decouple.runtime``: all K in one process, or one)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.layout = layout = resolve_layout(cfg.decouple)
        self.device = pick_device(cfg.train, layout)
        init_distributed(layout, self.device)
        self.world_size, self.replicas, self.replica_index = layout.world_size, layout.replicas, layout.dp_index
        self.grad_accum, self.micro_batch_size = cfg.train.grad_accum, cfg.train.micro_batch_size
        self.is_main, self.is_logger = layout.is_main, layout.is_last

    def barrier(self) -> None:
        if self.layout.runtime == "distributed":
            import torch.distributed as dist

            dist.barrier()

    def build(self, objective, collator, out_dir: Path, tokenizer) -> nn.Module:
        cfg = self.cfg
        self.collator = collator
        self.model = ChunkedModel(objective.build_model(cfg.model), objective, cfg.decouple).to(self.device)
        if fast_enabled(cfg.model, self.device):  # static shapes, fused layers, each chunk compiled
            apply_fast_path_to_chunks(self.model, cfg.data.block_size)
        self.pipeline = Pipeline(self.model, cfg, self.layout, self.device)
        self.pipeline.probe = self.main_first(lambda: build_probe(cfg, objective, tokenizer, self.device))
        self.model.train()
        return self.model.model

    def describe(self) -> dict:
        return {"runtime": self.layout.runtime, "layer_ranges": self.model.ranges}

    def train_step(self, micro_batches: list[dict], lr: float, step: int) -> None:
        normalizers = window_normalizers(self.collator, micro_batches, self.device)
        with compile_errors_explained():
            self.pipeline.train_step(micro_batches, normalizers, lr, step)

    def window_metrics(self) -> dict[str, float] | None:
        metrics = self.pipeline.gather_metrics()
        if metrics is None:
            return None
        last = self.layout.chunks - 1
        return {"grad_norm": metrics.get(f"chunk{last}_grad_norm"),
                "skipped_steps": sum(v for k, v in metrics.items() if k.endswith("_skipped_steps")), **metrics}

    def evaluate(self, val_blocks) -> dict[str, float] | None:
        return self.pipeline.evaluate(self.collator, val_blocks)

    def save(self, root: Path, step: int, state: dict, keep_last: int) -> Path:
        return self.pipeline.save(root, step, dict(state, decouple=self.layout.chunks), keep_last)

    def load(self, path: Path) -> dict:
        return self.pipeline.load(path)

    def export_model(self, checkpoint: Path) -> tuple[nn.Module, dict] | None:
        """The stitched stock model, on the last process: it holds its own chunks and reads the others from the
        final checkpoint. The process group is left first: ``save_pretrained`` writes nothing on ranks other than
        0 of a live group."""
        self.pipeline.close()
        if self.layout.runtime == "distributed":
            import torch.distributed as dist

            self.barrier()
            dist.destroy_process_group()
        if not self.is_logger:
            return None
        if self.layout.runtime == "distributed":
            load_chunks(self.model, checkpoint, range(self.layout.chunks - 1))
        return self.model.export_model().float().cpu(), sidecar_files(self.model)

    def close(self) -> None:
        self.pipeline.close()
