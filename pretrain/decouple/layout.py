"""Who runs which chunk: the process layout of a decoupled launch, its device and its process group.

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
