"""A deterministic, resumable data stream shared by every process.

The stream is the infinite sequence of blocks ``perm_0 ++ perm_1 ++ …`` where ``perm_e`` is a permutation of the
dataset seeded by ``(seed, epoch)``. Global micro-batch ``t`` holds stream positions ``[t·W·B, (t+1)·W·B)``; rank
``r`` of ``W`` takes the slice ``[t·W·B + r·B, t·W·B + (r+1)·B)``. So the ranks' shares are disjoint and together
complete, a run with W processes × B sees exactly the samples of 1 process × W·B, and resuming at micro-batch ``t``
is O(1). Each example carries its stream position as ``"index"``, which seeds its masking.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: stream positions of validation examples start here, so their masking seeds never collide with training ones
VALIDATION_INDEX_OFFSET = 1 << 40


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]))
    return rng.permutation(n)


class StreamDataset(Dataset):
    """Stream position -> block of ``blocks`` (a map-style dataset of dicts), tagged with ``index`` = position.

    ``shuffle=False`` reads blocks in order (validation); ``index_offset`` separates the seeds of two streams."""

    def __init__(self, blocks, seed: int, shuffle: bool = True, index_offset: int = 0):
        if len(blocks) == 0:
            raise ValueError("the dataset has no blocks")
        self.blocks, self.seed, self.shuffle, self.index_offset = blocks, seed, shuffle, index_offset
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(len(self.blocks), self.seed, epoch)

    def __len__(self) -> int:  # one epoch; positions beyond it are valid too (later epochs)
        return len(self.blocks)

    def __getitem__(self, position: int) -> dict:
        epoch, offset = divmod(int(position), len(self.blocks))
        block = int(self._perm(epoch)[offset]) if self.shuffle else offset
        example = dict(self.blocks[block])
        example["index"] = self.index_offset + int(position)
        return example


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this rank's stream positions, one micro-batch at a time, from global micro-batch ``start``.

    ``stop`` (exclusive) bounds the number of global micro-batches (None = infinite)."""

    def __init__(self, micro_batch_size: int, world_size: int = 1, rank: int = 0, start: int = 0,
                 stop: int | None = None):
        self.b, self.w, self.r, self.start, self.stop = micro_batch_size, world_size, rank, start, stop

    def __iter__(self):
        t = self.start
        while self.stop is None or t < self.stop:
            base = t * self.w * self.b + self.r * self.b
            yield list(range(base, base + self.b))
            t += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an infinite stream has no length")
        return max(0, self.stop - self.start)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_loader(dataset, collate, micro_batch_size, world, rank, start, stop, num_workers, pin_memory=False):
    """A DataLoader over this rank's stream positions. Its own generator keeps it from drawing on the global torch
    RNG (which would shift dropout masks after a resume); masking is seeded per sample, not per worker.
    ``pin_memory`` (training on CUDA): page-locked batches, so the step's non-blocking copies do not stall the host."""
    sampler = StreamBatchSampler(micro_batch_size, world, rank, start=start, stop=stop)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(start), pin_memory=pin_memory,
    )


def validation_share(n_blocks: int, micro_batch_size: int, eval_batches: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s stream positions of the fixed validation set: the first ``eval_batches × micro_batch_size``
    blocks (all of them if the split is smaller), cut into ``world_size`` contiguous shares whose sizes differ by at
    most one. The set, and so every evaluation metric, does not depend on the number of processes."""
    n = min(eval_batches * micro_batch_size, n_blocks)
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def validation_loader(val_blocks, collate, train_cfg, world_size: int, rank: int) -> DataLoader:
    """This rank's share (``validation_share``) of the fixed validation set in micro-batches of at most
    ``train.micro_batch_size`` blocks, in order, masked with seeds of their own stream positions (fixed masks from
    evaluation to evaluation, and never a training sample's). A rank whose share is empty (fewer blocks than
    processes) gets no batches."""
    b = train_cfg.micro_batch_size
    share = validation_share(len(val_blocks), b, train_cfg.eval_batches, world_size, rank)
    batches = [list(share[i:i + b]) for i in range(0, len(share), b)]
    dataset = StreamDataset(val_blocks, train_cfg.seed, shuffle=False, index_offset=VALIDATION_INDEX_OFFSET)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0)
