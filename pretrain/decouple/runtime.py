"""Runtimes of ``decouple.mode`` local and synthetic: simulated (one process runs every chunk) and distributed (one
process per chunk), with one code path so their semantics are the same by construction.

**Rank layout.** A launch of ``W = D × K`` processes (``torchrun --nproc_per_node K``, ``accelerate launch
--num_processes K``; several machines with ``--nnodes``) holds D data-parallel replicas of a K-chunk pipeline::

    rank = dp_index * K + chunk        chunk = rank % K,  dp_index = rank // K

so a pipeline's chunks are consecutive ranks (on one machine with K GPUs each chunk-to-chunk send stays on the
machine), and chunk k's replicas are ``{k, K + k, 2K + k, …}``: one process group per chunk, which sums the
window's target counts before the step and chunk k's gradients before its update (and the logged metrics), so the
D replicas of a chunk take identical steps, as D-way data parallelism would. Replica d reads its own share of the
stream (``StreamBatchSampler(world_size=D, rank=d)``): a step's global batch is D × ``grad_accum`` ×
``micro_batch_size`` blocks, and D pipelines of micro-batch b train exactly like one pipeline of micro-batch D·b
(tested). Pipeline 0 evaluates, logs and writes checkpoints (the replicas hold the same weights); every replica
resumes from them. Local mode only (synthetic mode would also have to share M_k's updates and target scale).

**Schedule.** Per optimizer step every process rebuilds its pipeline's micro-batches (same seed: masks and labels
are known to every chunk), counts their targets (token-exact normalisers; summed over the replicas when D > 1),
then for each micro-batch t: receive chunk k-1's output for t (chunk 0 embeds the ids), forward, send the output to
chunk k+1 (``isend``, at most ``max_in_flight`` outstanding), backward the chunk's own loss. After the window each
chunk (D > 1: sums its gradients over its replicas) clips its own gradients, skips its own update on a non-finite
norm, and steps its own AdamW. Nothing ever flows down, so chunk k never waits for chunk k+1: while chunk k works
on micro-batch t, chunk k-1 already computes t+1 (and may run into the next optimizer step). Metrics, evaluation
results and "checkpoint written" notes also flow up, to the process that holds the last chunk, which logs, commits
checkpoints and exports; no step is a barrier.

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

import collections
import copy
import json
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from objectives import get_objective

from ..checkpoint import COMPLETE, CheckpointError, commit_checkpoint, latest_checkpoint, read_state
from ..config import Config, config_to_dict, save_config
from ..data.stream import StreamDataset, to_device
from ..hf_io import roundtrip_check
from ..fast import apply_fast_path_to_chunks, fast_enabled
from ..metrics import MetricsLogger, MetricTracker, peak_flops, train_flops_per_token
from ..schedules import lr_for, momentum_for
from ..data.stream import make_loader
from ..optim import build_optimizer, step_if_finite
from ..rundir import check_tokenizer, prepare_run_dir
from ..trainer import VALIDATION_INDEX_OFFSET
from .chunks import ChunkedModel
from .synthetic import SYNTHETIC_EXPORT_FILE, SYNTHETIC_FILE, SyntheticStageMixin

#: message tags: activations (train and eval, in program order), metric dicts, "chunk saved" notes, true gradients
#: of a chunk's input (synthetic mode, micro-batch order)
TAG_ACTIVATION, TAG_METRICS, TAG_SAVED, TAG_GRADIENT = 1, 2, 3, 4
#: file written beside the Hugging Face export with the auxiliary heads of chunks 0..K-2
AUX_HEADS_FILE = "aux_heads.safetensors"


# --------------------------------------------------------------------------- process layout


@dataclass
class Layout:
    """Who holds what: see the module docstring for ``rank = dp_index * chunks + chunk``."""

    runtime: str
    """``simulated`` (one process, every chunk) or ``distributed`` (one process per chunk)."""
    chunks: int
    world_size: int
    rank: int

    @property
    def dp_index(self) -> int:
        return self.rank // self.chunks if self.runtime == "distributed" else 0

    @property
    def replicas(self) -> int:
        """D: data-parallel copies of the pipeline."""
        return self.world_size // self.chunks if self.runtime == "distributed" else 1

    @property
    def local_chunks(self) -> list[int]:
        """Chunks this process runs, in order."""
        return [self.rank % self.chunks] if self.runtime == "distributed" else list(range(self.chunks))

    def rank_of(self, chunk: int) -> int:
        """Rank that holds ``chunk`` in this process's pipeline."""
        return self.dp_index * self.chunks + chunk if self.runtime == "distributed" else self.rank

    def is_local(self, chunk: int) -> bool:
        return chunk in self.local_chunks

    @property
    def is_main(self) -> bool:
        """Rank 0 prepares the run directory and the data cache."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """Holds the last chunk of pipeline 0: logs, commits checkpoints and exports."""
        return self.is_local(self.chunks - 1) and self.dp_index == 0


def resolve_layout(decouple_cfg) -> Layout:
    """The layout of this launch (``WORLD_SIZE``/``RANK`` from torchrun or accelerate) and ``decouple.runtime``."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    k = decouple_cfg.chunks
    runtime = decouple_cfg.runtime
    if runtime == "auto":
        runtime = "distributed" if world > 1 else "simulated"
    if runtime == "simulated" and world != 1:
        raise ValueError(f"decouple.runtime=simulated runs every chunk in one process, but {world} processes were "
                         "launched; launch one process or set decouple.runtime=distributed")
    if runtime == "distributed" and (world < k or world % k):
        raise ValueError(f"decouple.runtime=distributed needs one process per chunk: launch {k} processes "
                         f"(torchrun --nproc_per_node {k}), or a multiple of {k} for data-parallel pipelines, "
                         f"got {world}")
    if runtime == "distributed" and world > k and decouple_cfg.mode == "synthetic":
        raise NotImplementedError(
            f"{world} processes for {k} chunks are {world // k} data-parallel pipelines, implemented for "
            f"decouple.mode=local only (synthetic mode would also have to share M_k's updates): launch "
            f"decouple.chunks={k} processes")
    return Layout(runtime, k, world, rank)


def init_distributed(layout: Layout, device: torch.device) -> None:
    """Join the default process group (gloo on CPU, NCCL on CUDA) unless this process already did."""
    import torch.distributed as dist

    if layout.runtime != "distributed" or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


def pick_device(train_cfg, layout: Layout) -> torch.device:
    if train_cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- point-to-point messages


class Link:
    """Sends and receives between this process and the others of its pipeline. Sends are asynchronous: a process
    only waits when more than ``max_in_flight`` of its sends are outstanding (that bounds how far it runs ahead)."""

    def __init__(self, layout: Layout, device: torch.device, max_in_flight: int = 4):
        self.layout, self.device, self.max_in_flight = layout, device, max_in_flight
        self.pending: collections.deque = collections.deque()

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        import torch.distributed as dist

        self.pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))  # keep the tensor alive until sent
        while len(self.pending) > self.max_in_flight:
            self.pending.popleft()[0].wait()

    def _recv(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=src, tag=tag)
        return buf

    def send_activations(self, outputs: dict[str, torch.Tensor], chunk: int) -> None:
        """``outputs`` of ``chunk`` to ``chunk + 1``: the hidden states (fp32) and carried tensors, in key order."""
        for key in sorted(outputs):
            self._isend(outputs[key].contiguous(), self.layout.rank_of(chunk + 1), TAG_ACTIVATION)

    def recv_activations(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], chunk: int) -> dict:
        """What ``chunk - 1`` sent; ``spec``: key -> (shape, dtype), known from the batch every process holds."""
        src = self.layout.rank_of(chunk - 1)
        return {key: self._recv(*spec[key], src=src, tag=TAG_ACTIVATION) for key in sorted(spec)}

    def send_gradient(self, grad: torch.Tensor, chunk: int) -> None:
        """The true gradient of ``chunk``'s input (fp32 [B, L, H]) to ``chunk - 1`` (synthetic mode)."""
        self._isend(grad.float().contiguous(), self.layout.rank_of(chunk - 1), TAG_GRADIENT)

    def recv_gradient(self, shape, chunk: int) -> torch.Tensor:
        """The true gradient of ``chunk``'s output, from ``chunk + 1``."""
        return self._recv(shape, torch.float32, self.layout.rank_of(chunk + 1), TAG_GRADIENT)

    def send_object(self, obj, dst_chunk: int, tag: int) -> None:
        """A small JSON-able object (metrics, notes) to the holder of ``dst_chunk``: length, then UTF-8 bytes."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device)
        dst = self.layout.rank_of(dst_chunk)
        self._isend(torch.tensor([data.numel()], dtype=torch.long, device=self.device), dst, tag)
        self._isend(data, dst, tag)

    def recv_object(self, src_chunk: int, tag: int):
        src = self.layout.rank_of(src_chunk)
        n = int(self._recv((1,), torch.long, src, tag).item())
        return json.loads(bytes(self._recv((n,), torch.uint8, src, tag).cpu().numpy()).decode())

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft()[0].wait()


# --------------------------------------------------------------------------- per-chunk state


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
    (fp16), dropout RNG and metric tracker. ``frozen`` chunks (the frozen-random control) run forward only."""

    def __init__(self, model: ChunkedModel, k: int, cfg: Config, device: torch.device, frozen: bool,
                 replica: int = 0):
        self.k, self.model, self.chunk, self.frozen = k, model, model.chunks[k], frozen
        self.params = model.chunk_parameters(k)
        self.optimizer = None if frozen else build_optimizer(nn.ParameterList(self.params), cfg.train, device.type)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" and not frozen else None
        self.rng = ChunkRNG(cfg.train.seed, k, device, replica)
        self.tracker = MetricTracker(self.chunk.metric_counts)
        self.skipped = 0
        self.grad_norm = torch.zeros((), device=device)

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
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if beta1 is not None:
                group["betas"] = (beta1, *group["betas"][1:])
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
        from safetensors.torch import load_file

        try:
            self.model.load_chunk_state_dict(self.k, load_file(str(directory / "model.safetensors")))
            state = torch.load(directory / "state.pt", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure means the files are unusable; name them
            raise CheckpointError(f"cannot load chunk {self.k} from {directory}: {type(e).__name__}: {e}") from e
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.rng.load_state_dict(state["rng"])
        self.skipped = state["skipped"]


class SyntheticStage(SyntheticStageMixin, Stage):
    """A chunk of ``decouple.mode: synthetic``: learns from predicted (and true) gradients of its output."""


# --------------------------------------------------------------------------- the pipeline


class Pipeline:
    """The chunks this process holds, and how their inputs/outputs reach the other processes."""

    def __init__(self, model: ChunkedModel, cfg: Config, layout: Layout, device: torch.device):
        self.model, self.cfg, self.layout, self.device = model, cfg, layout, device
        k_total = layout.chunks
        frozen = set(range(k_total - 1)) if cfg.decouple.freeze_lower else set()
        self.synthetic = cfg.decouple.mode == "synthetic"
        if self.synthetic:
            if cfg.train.precision == "fp16":
                raise NotImplementedError("decouple.mode=synthetic does not implement fp16 loss scaling of the "
                                          "gradients it exchanges: use train.precision bf16 or fp32")
            self.stages = [SyntheticStage(model, k, cfg, device) for k in layout.local_chunks]
        else:
            self.stages = [Stage(model, k, cfg, device, k in frozen, layout.dp_index) for k in layout.local_chunks]
        # synthetic mode: up to S+1 true gradients travel down while activations travel up
        in_flight = 4 + (2 * (cfg.decouple.synthetic.staleness + 1) if self.synthetic else 0)
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
        """One optimizer step of every local chunk. ``step`` (0-based): one-cycle's beta1 and, in synthetic mode, during
        ``synthetic.warmup_steps`` and on checkpoint steps the window waits for all its true gradients (a drained
        pipeline is what a checkpoint can hold); None = neither."""
        if self.replica_group is not None:  # the global batch's target counts
            keys = sorted(normalizers)
            total = self._sum_replicas(torch.stack([normalizers[k].to(self.device) for k in keys]))
            normalizers = dict(zip(keys, total.unbind()))
        drain = False
        if self.synthetic and step is not None:
            t, warm = self.cfg.train, step < self.cfg.decouple.synthetic.warmup_steps
            drain = warm or step + 1 == t.max_steps or bool(t.save_every and (step + 1) % t.save_every == 0)
            for stage in self.stages:
                stage.use_true = warm
        for batch in micro_batches:
            batch = to_device(batch, self.device)
            self._run(batch, lambda stage, inputs: stage.forward_backward(batch, inputs, normalizers, self.autocast))
            if self.synthetic:
                self.exchange_gradients(drain=False)
        if self.synthetic:
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
        """Synthetic mode, top chunk first: send each chunk's input gradients down, then hand each chunk the true
        output gradients that are due (all outstanding ones when ``drain``: call that before ``link.flush()`` or a
        barrier, which would otherwise wait for gradients nobody receives)."""
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
        cfg = self.cfg
        b = cfg.train.micro_batch_size
        n_batches = max(1, min(cfg.train.eval_batches, len(val_blocks) // b))
        dataset = StreamDataset(val_blocks, cfg.train.seed, shuffle=False, index_offset=VALIDATION_INDEX_OFFSET)
        loader = make_loader(dataset, collator.collate, b, 1, 0, 0, n_batches, 0)
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
        self.model.train()
        merged = {}
        for tracker in trackers.values():
            merged.update(tracker.compute())
        return self._to_last(merged)

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
        state = read_state(path)
        if state.get("decouple") != self.cfg.decouple.chunks:
            raise CheckpointError(f"{path} was not written by a {self.cfg.decouple.chunks}-chunk decoupled run")
        for stage in self.stages:
            stage.load(path / f"chunk{stage.k}")
        return state

    def close(self) -> None:
        if self.link is not None:
            self.link.flush()


def window_normalizers(collator, micro_batches: list[dict], device) -> dict[str, torch.Tensor]:
    """Target counts summed over the step's micro-batches (the pipeline's share of the step), on ``device``."""
    counts = collator.window_counts(micro_batches)
    return {k: v.to(device, non_blocking=True) for k, v in counts.items()}  # no wait for queued kernels


# --------------------------------------------------------------------------- building, export


def build_chunked_model(cfg: Config, tokenizer, unigram_counts=None) -> tuple[ChunkedModel, object]:
    """The objective, its model and the auxiliary heads, cut into ``decouple.chunks`` chunks. Call after seeding:
    every process builds the whole model the same way, so a chunk's initial weights do not depend on the runtime.
    Returns ``(chunked_model, collator)`` where the collator is a CPU copy of the objective for the data loaders."""
    objective = get_objective(cfg.objective.name, tokenizer, seed=cfg.train.seed, **cfg.objective.options())
    if unigram_counts is not None and hasattr(objective, "set_unigram_counts"):
        objective.set_unigram_counts(unigram_counts)
    model = objective.build_model(cfg.model)
    collator = copy.deepcopy(objective)
    return ChunkedModel(model, objective, cfg.decouple), collator


def export_stitched(model: ChunkedModel, export_dir: Path, tokenizer, cfg: Config, sample: torch.Tensor | None) -> None:
    """Stitch the chunks into the stock model, export it with the objective's ``export``, put the auxiliary heads
    and synthetic-gradient modules beside it (``aux_heads.safetensors``, ``synthetic_gradients.safetensors``; not in
    the HF weights) and check the export in a fresh process."""
    from safetensors.torch import save_file

    stitched = model.export_model().float().cpu()
    model.objective.export(stitched, export_dir, tokenizer)
    save_config(cfg, export_dir / "pretrain_config.yaml")
    if len(model.aux):
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.aux_state_dict().items()}
        meta = {"format": "pt", "aux_head": model.aux_head, "layer_ranges": json.dumps(model.ranges),
                "objective": model.objective.name}
        save_file(tensors, str(export_dir / AUX_HEADS_FILE), metadata=meta)
    if len(model.synthetic):
        tensors = {f"synthetic.{k}": v.detach().float().cpu().contiguous()
                   for k, v in model.synthetic.state_dict().items()}
        meta = {"format": "pt", "layer_ranges": json.dumps(model.ranges), "objective": model.objective.name}
        save_file(tensors, str(export_dir / SYNTHETIC_EXPORT_FILE), metadata=meta)
    if sample is not None:
        for path, auto_class, reference in model.objective.export_targets(stitched, export_dir):
            check = roundtrip_check(path, auto_class, reference, sample)
            print(f"exported {path}: reloaded as {check['class']} in a fresh process, "
                  f"max |logit difference| {check['max_abs_err']:.2e}", flush=True)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[ChunkedModel, object, Config]:
    """Rebuild a decoupled run's :class:`ChunkedModel` from ``run_dir`` and load every chunk of a checkpoint
    (default: the newest complete one). Returns ``(model, tokenizer, cfg)``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ..config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if path is None or not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    model, _ = build_chunked_model(cfg, tokenizer)
    for k in range(model.num_chunks):
        model.load_chunk_state_dict(k, load_file(str(path / f"chunk{k}" / "model.safetensors")))
    for k, module in enumerate(model.synthetic):
        module.load_state_dict(load_file(str(path / f"chunk{k}" / SYNTHETIC_FILE)))
    return model, tokenizer, cfg


def export_run(run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Export a checkpoint of a decoupled run (the decoupled counterpart of ``pretrain.export.export_checkpoint``)."""
    model, tokenizer, cfg = load_run(run_dir, checkpoint)
    out = Path(out) if out else Path(run_dir) / "export"
    export_stitched(model, out, tokenizer, cfg, sample=None)
    return out


# --------------------------------------------------------------------------- the loop


def fit_decoupled(cfg: Config, overwrite: bool = False, data=None) -> dict:
    """``fit`` for ``decouple.mode`` local or synthetic: train every chunk to ``train.max_steps`` (resuming
    from the newest complete checkpoint), evaluate, export. ``data``: a prepared-data object (``tokenizer``,
    ``train``, ``validation``, ``unigram_counts``) instead of ``prepare_blocks(cfg)`` (tests). Returns the final
    validation metrics on the process holding the last chunk ({} elsewhere)."""
    from accelerate.utils import set_seed

    t = cfg.train
    layout = resolve_layout(cfg.decouple)
    device = pick_device(t, layout)
    init_distributed(layout, device)
    barrier = _barrier if layout.runtime == "distributed" else (lambda: None)
    out = prepare_run_dir(cfg, overwrite, layout.is_main)
    barrier()
    set_seed(t.seed)
    if data is None:
        from ..data import prepare_blocks

        if layout.is_main:
            data = prepare_blocks(cfg)
        barrier()
        if data is None:
            data = prepare_blocks(cfg)  # from the cache rank 0 just wrote
    tokenizer = data.tokenizer
    check_tokenizer(cfg, tokenizer)
    model, collator = build_chunked_model(cfg, tokenizer, getattr(data, "unigram_counts", None))
    model.to(device)
    if fast_enabled(cfg.model, device):  # static shapes, fused layers, each chunk compiled (pretrain/fast.py)
        apply_fast_path_to_chunks(model, cfg.data.block_size)
    pipeline = Pipeline(model, cfg, layout, device)
    if layout.is_main:
        tokenizer.save_pretrained(str(out / "tokenizer"))

    state = {"step": 0, "tokens": 0}
    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = pipeline.load(resume)
        if layout.is_last:
            print(f"resumed from {resume} (step {state['step']})", flush=True)

    tokens_per_step = layout.replicas * t.grad_accum * t.micro_batch_size * cfg.data.block_size
    loader = make_loader(StreamDataset(data.train, t.seed), collator.collate, t.micro_batch_size, layout.replicas,
                         layout.dp_index, start=state["step"] * t.grad_accum, stop=None,
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    n_params = sum(p.numel() for n, p in model.model.named_parameters() if "embeddings" not in n)
    n_layers = sum(stop - start for start, stop in model.ranges)
    flops_per_step = tokens_per_step * train_flops_per_token(n_params, n_layers, cfg.model.hidden_size,
                                                             cfg.data.block_size)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    logger = MetricsLogger(out, layout.is_last, cfg.log.tensorboard, t.max_steps)
    logger.log({"event": "resume" if resume else "start", "step": state["step"], "world_size": layout.world_size,
                "runtime": layout.runtime, "layer_ranges": model.ranges, "config": config_to_dict(cfg)}, prefix="run")
    parts = model.objective.loss_parts

    def log_eval(step):
        metrics = pipeline.evaluate(collator, data.validation)
        if metrics is not None:
            logger.log({"step": step, **metrics}, prefix="eval")
        return metrics

    if state["step"] == 0 and t.eval_every:
        log_eval(0)
    model.train()
    step, window_start, data_wait, window_steps = state["step"], time.perf_counter(), 0.0, 0
    while step < t.max_steps:
        lr = lr_for(t, step)
        fetch_start = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum)]
        data_wait += time.perf_counter() - fetch_start
        pipeline.train_step(micro, window_normalizers(collator, micro, device), lr, step)
        step += 1
        window_steps += 1
        state.update(step=step, tokens=state["tokens"] + tokens_per_step)

        if step % t.log_every == 0 or step == t.max_steps:
            metrics = pipeline.gather_metrics()
            if metrics is not None:
                elapsed = time.perf_counter() - window_start
                last = layout.chunks - 1
                record = {"step": step, "lr": lr, "tokens": state["tokens"],
                          "tok_per_s": tokens_per_step * window_steps / elapsed,
                          "grad_norm": metrics.get(f"chunk{last}_grad_norm"),
                          "skipped_steps": sum(v for k, v in metrics.items() if k.endswith("_skipped_steps")),
                          "mfu": flops_per_step * window_steps / elapsed / (peak * layout.world_size) if peak else None,
                          "data_wait": data_wait / elapsed, **metrics}
                record["loss"] = sum(w * record.get(p, 0.0) for p, (_, w) in parts.items())
                logger.log(record)
                logger.progress(record, elapsed / window_steps)
            window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0

        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
            log_eval(step)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            pipeline.save(ckpt_root, step, dict(state, config=config_to_dict(cfg), decouple=layout.chunks),
                          t.keep_last)

    final = log_eval(step) or {}
    pipeline.close()
    logger.close()
    if layout.runtime == "distributed":
        import torch.distributed as dist

        barrier()
        # leave the group before exporting: transformers' save_pretrained writes nothing on ranks other than 0
        dist.destroy_process_group()
    if layout.is_last:
        print("final validation: " + json.dumps({k: round(v, 4) for k, v in final.items()
                                                 if not k.startswith("n_")}), flush=True)
        # the final checkpoint holds every chunk: stitch them into the full model (this process holds its own only)
        final_ckpt = ckpt_root / f"step-{step}"
        if layout.runtime == "distributed":
            from safetensors.torch import load_file

            for k in range(layout.chunks - 1):
                model.load_chunk_state_dict(k, load_file(str(final_ckpt / f"chunk{k}" / "model.safetensors")))
                if len(model.synthetic):
                    model.synthetic[k].load_state_dict(load_file(str(final_ckpt / f"chunk{k}" / SYNTHETIC_FILE)))
        sample = torch.stack([torch.as_tensor(data.validation[i]["input_ids"])
                              for i in range(min(2, len(data.validation)))])
        export_stitched(model, out / "export", tokenizer, cfg, sample)
    return final


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


__all__ = ["fit_decoupled", "Pipeline", "Stage", "SyntheticStage", "Layout", "resolve_layout", "build_chunked_model",
           "export_run", "load_run", "export_stitched", "window_normalizers", "AUX_HEADS_FILE", "SYNTHETIC_EXPORT_FILE"]
