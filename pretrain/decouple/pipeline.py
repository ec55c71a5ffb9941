"""The pipeline of the decoupling modes (local, synthetic): simulated (one process runs every chunk) and
distributed (one process per chunk), with one code path so their semantics are the same by construction.

The process layout (who holds which chunk, data-parallel replicas) is :mod:`.layout`'s.

**Schedule.** Per optimizer step every process rebuilds its pipeline's micro-batches (same seed: masks and labels
are known to every chunk), counts their targets (token-exact normalisers; summed over the replicas when D > 1),
then for each micro-batch t: receive chunk k-1's output for t (chunk 0 embeds the ids), forward, send the output to
chunk k+1 (``isend``, at most ``max_in_flight`` outstanding), backward the chunk's own loss. After the window each
chunk (D > 1: sums its gradients over its replicas) clips its own gradients, skips its own update on a non-finite
norm, and steps its own AdamW. Nothing ever flows down, so chunk k never waits for chunk k+1: while chunk k works
on micro-batch t, chunk k-1 already computes t+1 (and may run into the next optimizer step). Metrics, evaluation
results and "checkpoint written" notes also flow up, to the process that holds the last chunk, which logs, commits
checkpoints and exports; no step is a barrier.

**Overlapping local updates** (``decouple.overlap: M``, ``overlap.py``) add one message kind flowing down: after its
backward pass for micro-batch t, chunk k > 0 sends the gradient of its loss at its input to chunk k-1, which
backpropagates it through its top M layers right after computing t+1; every window drains before the update.

**Synthetic mode** (``synthetic.py``) adds one message kind flowing down: after its backward pass for micro-batch t,
chunk k > 0 sends the true gradient of its input to chunk k-1, which receives the gradient of t-S right after it
has computed micro-batch t (S = ``decouple.synthetic.staleness``). Warm-up and checkpoint steps drain: the window
waits for all of its true gradients before the update, so a checkpoint never holds a half-finished exchange.

The simulated runtime is the same loop with every chunk local (no sends; in synthetic mode the chunks hand each
other their true gradients top chunk first, in the order the distributed processes receive them). Each chunk has
its own dropout RNG stream, swapped into the global generator around the chunk's work, so both runtimes draw the
same dropout masks.

**Fast path** (``model.fast``, on by default on CUDA): every chunk runs static-shape heads and fused layers, and its
forward is compiled (``pretrain.fast.apply_fast_path_to_chunks``); parameters, checkpoints and exports are unchanged.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint import STATE_FILE, CheckpointError, commit_checkpoint, read_state, verify_checkpoint
from ..config import Config
from ..data.stream import to_device, validation_loader
from ..metrics import MetricTracker
from ..probe import ProbeSet, mean_pool
from ..schedules import momentum_for
from .chunks import ChunkedModel
from .layout import Layout
from .link import TAG_METRICS, TAG_SAVED, Link
from .modes import stage_class
from .overlap import OverlapStage


class Pipeline:
    """The chunks this process holds, and how their inputs/outputs reach the other processes."""

    probe: ProbeSet | None = None  #: linear probes of each chunk's output at evaluation (``train.probe``)

    def __init__(self, model: ChunkedModel, cfg: Config, layout: Layout, device: torch.device):
        self.model, self.cfg, self.layout, self.device = model, cfg, layout, device
        # decouple.overlap (local mode): the chunks also exchange gradients at the layers they share
        stage = OverlapStage if cfg.decouple.overlap else stage_class(cfg.decouple.mode)
        self.stages = [stage(model, k, cfg, device, layout.dp_index) for k in layout.local_chunks]
        # 4 activation sends, plus what the mode sends down (synthetic: up to S+1 true gradients) meanwhile
        in_flight = 4 + stage.messages_down(cfg)
        self.link = Link(layout, device, in_flight) if layout.runtime == "distributed" else None
        precision = cfg.train.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        hidden = model.chunks[0].config.hidden_size
        self._carry = dict(model.objective.carry)
        self._hidden = hidden
        #: data-parallel pipelines: the process group of this process's chunk and its replicas (None when D = 1)
        self.replica_group = None
        if layout.replicas > 1:
            import torch.distributed as dist

            k_total = layout.chunks  # every rank creates every group, in the same order
            groups = [dist.new_group([d * k_total + k for d in range(layout.replicas)]) for k in range(k_total)]
            self.replica_group = groups[layout.local_chunks[0]]

    def _sum_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over this chunk's replicas (in place; unchanged when D = 1)."""
        if self.replica_group is not None:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.replica_group)
        return tensor

    def boundary_spec(self, batch) -> dict:
        """Shapes/dtypes of what crosses a boundary for ``batch``: hidden [B, L, H] fp32 (+ ELECTRA's labels)."""
        b, length = batch["input_ids"].shape
        spec = {"hidden": ((b, length, self._hidden), torch.float32)}
        spec.update({key: ((b, length), dtype) for key, dtype in self._carry.items()})
        return spec

    def _run(self, batch, fn):
        """Run ``fn(stage, inputs) -> outputs`` for each local chunk in order, receiving the first one's inputs and
        sending the last one's outputs when the neighbouring chunk lives in another process."""
        inputs = None
        for stage in self.stages:
            k = stage.k
            if k > 0 and not self.layout.is_local(k - 1):
                inputs = self.link.recv_activations(self.boundary_spec(batch), k)
            inputs = fn(stage, inputs)
            if k < self.layout.chunks - 1 and not self.layout.is_local(k + 1):
                self.link.send_activations(inputs, k)

    def train_step(self, micro_batches: list[dict], normalizers: dict, lr: float, step: int | None = None) -> None:
        """One optimizer step of every local chunk. ``step`` (0-based): one-cycle's beta1 and each stage's
        ``begin_window`` (synthetic mode: during ``synthetic.warmup_steps`` and on checkpoint steps the window waits
        for all its true gradients, a drained pipeline being what a checkpoint can hold); None = neither."""
        if self.replica_group is not None:  # the global batch's target counts
            keys = sorted(normalizers)
            total = self._sum_replicas(torch.stack([normalizers[k].to(self.device) for k in keys]))
            normalizers = dict(zip(keys, total.unbind()))
        # a window that must wait for all the messages it started (synthetic: warm-up and checkpoint steps)
        drain = any([stage.begin_window(step) for stage in self.stages])
        for batch in micro_batches:
            batch = to_device(batch, self.device)
            self._run(batch, lambda stage, inputs: stage.forward_backward(batch, inputs, normalizers, self.autocast))
            self.exchange_gradients(drain=False)
        if drain:
            self.exchange_gradients(drain=True)
        for stage in reversed(self.stages):
            stage.release_graphs()
            self._send_gradients(stage)
        beta1 = momentum_for(self.cfg.train, step) if step is not None else None  # one-cycle only
        for stage in self.stages:
            if self.replica_group is not None:
                stage.sum_gradients(self._sum_replicas)
            stage.update(lr, self.cfg.train.clip_grad_norm, beta1)

    def exchange_gradients(self, drain: bool) -> None:
        """Top chunk first: send each chunk's input gradients down, then hand each chunk the true output gradients
        that are due (all outstanding ones when ``drain``: call that before ``link.flush()`` or a
        barrier, which would otherwise wait for gradients nobody receives). A no-op for stages that exchange none."""
        for stage in reversed(self.stages):
            self._send_gradients(stage)
            for _ in range(len(stage.pending) if drain else stage.due()):
                if self.layout.is_local(stage.k + 1):
                    delta = self.stages[self.stages.index(stage) + 1].outbox.popleft()
                else:
                    delta = self.link.recv_gradient(stage.next_shape(), stage.k)
                stage.resolve(delta)
                self._send_gradients(stage)

    def _send_gradients(self, stage) -> None:
        """Send ``stage``'s input gradients to the process holding chunk k-1 (kept for a local chunk k-1)."""
        if stage.k > 0 and not self.layout.is_local(stage.k - 1):
            while stage.outbox:
                self.link.send_gradient(stage.outbox.popleft(), stage.k)

    def gather_metrics(self, local: dict[str, float] | None = None) -> dict[str, float] | None:
        """Every chunk's window metrics (plus ``local`` extras) merged on the last process; None elsewhere."""
        merged = dict(local or {})
        for stage in self.stages:
            merged.update(stage.window_metrics(self._sum_replicas))
        return self._to_last(merged)

    def _to_last(self, merged: dict) -> dict | None:
        if self.layout.runtime == "simulated":
            return merged
        if self.layout.dp_index > 0:  # pipeline 0 reports (metrics are summed over the replicas already)
            return None
        last = self.layout.chunks - 1
        if not self.layout.is_last:
            self.link.send_object(merged, last, TAG_METRICS)
            return None
        result = {}
        for k in range(self.layout.chunks - 1):  # lower chunks first: the last chunk's counts win on equal keys
            result.update(self.link.recv_object(k, TAG_METRICS))
        result.update(merged)
        return result

    @torch.no_grad()
    def evaluate(self, collator, val_blocks) -> dict[str, float] | None:
        """Token-exact validation metrics of every chunk (fixed blocks and masks); on the last process only."""
        if self.layout.dp_index > 0:  # the replicas hold pipeline 0's weights: it evaluates alone
            return None
        loader = validation_loader(val_blocks, collator.collate, self.cfg.train, world_size=1, rank=0)
        trackers = {s.k: MetricTracker(s.chunk.metric_counts) for s in self.stages}
        self.model.eval()

        def forward(stage, inputs):
            with self.autocast():
                outputs, out = stage.chunk(batch, inputs, None, with_head=not stage.frozen)
            trackers[stage.k].add(out)
            return outputs

        for batch in loader:
            batch = to_device(batch, self.device)
            self._run(batch, forward)
        merged = {}
        for tracker in trackers.values():
            merged.update(tracker.compute())
        if self.probe is not None:
            merged.update(self._probe_chunk_outputs())
        self.model.train()
        return self._to_last(merged)

    def _probe_chunk_outputs(self) -> dict[str, float]:
        """``probe_acc_layer{n}`` of each local chunk's output (n = the layers up to its end): the probe texts flow
        through the pipeline like a validation batch, without the heads; each process fits its own chunks'."""
        pooled = {stage.k: [] for stage in self.stages}

        def forward(stage, inputs):
            with self.autocast():
                outputs, _ = stage.chunk(batch, inputs, None, with_head=False)
            pooled[stage.k].append(mean_pool(outputs["hidden"], batch["attention_mask"]))
            return outputs

        for batch in self.probe.batches:
            self._run(batch, forward)
        return {f"probe_acc_layer{stage.chunk.layer_range[1]}": self.probe.score(pooled[stage.k])
                for stage in self.stages}

    # ------------------------------------------------------------------ checkpoints
    def save(self, root: Path, step: int, state: dict, keep_last: int) -> Path:
        """Each process writes its chunks to ``.step-N.tmp/chunk{k}/``; the last process waits for the others'
        notes, writes the trainer state and the COMPLETE marker and renames the directory into place."""
        tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
        if self.layout.dp_index > 0:  # pipeline 0 writes the weights every replica holds
            return final
        root.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            chunk_dir = tmp / f"chunk{stage.k}"
            if chunk_dir.exists():
                shutil.rmtree(chunk_dir)  # our own leftover from a crash while writing this very step
            stage.save(chunk_dir)
        if not self.layout.is_last:
            self.link.send_object({"step": step, "chunks": [s.k for s in self.stages]}, self.layout.chunks - 1,
                                  TAG_SAVED)
            return final
        if self.layout.runtime == "distributed":
            for k in range(self.layout.chunks - 1):
                note = self.link.recv_object(k, TAG_SAVED)
                if note["step"] != step:
                    raise RuntimeError(f"chunk {k} saved step {note['step']} while the last chunk saves {step}")
        return commit_checkpoint(root, step, tmp, state, keep_last)

    def load(self, path: Path) -> dict:
        """Verify this process' files of checkpoint ``path`` (its chunks and the trainer state) against the marker's
        checksums, then restore its chunks and return the trainer state."""
        verify_checkpoint(path, [STATE_FILE] + [f"chunk{stage.k}" for stage in self.stages])
        state = read_state(path)
        if state.get("decouple") != self.cfg.decouple.chunks:
            raise CheckpointError(f"{path} was not written by a {self.cfg.decouple.chunks}-chunk decoupled run")
        for stage in self.stages:
            stage.load(path / f"chunk{stage.k}")
        return state

    def close(self) -> None:
        """Receive the replies still outstanding (synthetic: true gradients), then wait for this process's sends."""
        self.exchange_gradients(drain=True)
        if self.link is not None:
            self.link.flush()


def window_normalizers(collator, micro_batches: list[dict], device) -> dict[str, torch.Tensor]:
    """Target counts summed over the step's micro-batches (the pipeline's share of the step), on ``device``."""
    counts = collator.window_counts(micro_batches)
    return {k: v.to(device, non_blocking=True) for k, v in counts.items()}  # no wait for queued kernels
