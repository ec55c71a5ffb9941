"""Metrics: token-exact accumulation on the device, metrics.jsonl, TensorBoard and one console progress line."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

#: dense bf16 peak FLOP/s by device-name substring, for MFU (None on unknown devices, e.g. CPUs)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def train_flops_per_token(n_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6·N for the weight matmuls plus 12·layers·hidden·seq for attention scores
    and values (PaLM appendix B). ``n_params`` should exclude the embedding tables."""
    return 6 * n_params + 12 * num_layers * hidden * seq_len


#: an objective's output ``ROC_PREFIX + name`` is a score histogram [2, ROC_BINS] (row 0: negatives, row 1:
#: positives, counts per bin of the score clamped to ±ROC_RANGE): summed over batches and processes, it is reported
#: as the ROC AUC ``name``
ROC_PREFIX, ROC_BINS, ROC_RANGE = "roc:", 4096, 16.0


def roc_histogram(scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[2, ROC_BINS] float counts of ``scores`` (any shape, e.g. logits) at ``valid`` positions, split by
    ``positive`` (same shape, bool). Static shapes, no host sync."""
    width = 2 * ROC_RANGE / ROC_BINS
    bins = ((scores.detach().float().clamp(-ROC_RANGE, ROC_RANGE) + ROC_RANGE) / width).long().clamp(max=ROC_BINS - 1)
    flat = positive.bool().long() * ROC_BINS + bins
    hist = torch.zeros(2 * ROC_BINS, device=scores.device)
    return hist.index_add_(0, flat.reshape(-1), valid.reshape(-1).float()).view(2, ROC_BINS)


def auc_from_histogram(hist: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + ½ P(same bin): the ROC AUC up to pairs that share a bin (at
    most ½ of ``Σ_b pos_b·neg_b / (n_pos·n_neg)`` off). NaN without positives or negatives."""
    neg, pos = hist.double()
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return math.nan
    below = torch.cumsum(neg, 0) - neg  # negatives in strictly lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


class MetricTracker:
    """Accumulates an objective's outputs over micro-batches without host syncs.

    Each logged metric m is averaged over its count key c (``objective.metric_counts``): sum(m·c) / sum(c), which is
    the token-exact mean over the window, never a mean of micro-batch means. Counts (``n_*``) and score histograms
    (``ROC_PREFIX`` keys, reported as ROC AUCs) are summed."""

    def __init__(self, metric_counts: dict[str, str]):
        self.metric_counts = metric_counts
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.histograms: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor]):
        for metric, count_key in self.metric_counts.items():
            if metric not in out or count_key not in out:
                continue
            c = out[count_key].detach().float()
            value = out[metric].detach().float() * c
            self.sums[metric] = self.sums.get(metric, 0) + value
            self.counts[metric] = self.counts.get(metric, 0) + c
        for key, value in out.items():
            if key.startswith("n_"):
                self.counts[key] = self.counts.get(key, 0) + value.detach().float()
            elif key.startswith(ROC_PREFIX):
                self.histograms[key] = self.histograms.get(key, 0) + value.detach().float()

    def compute(self, reduce=None) -> dict[str, float]:
        """Means (and raw counts, and AUCs) as Python floats; ``reduce`` sums a tensor across processes (one host
        sync)."""
        names = sorted(self.sums)
        counts = sorted(k for k in self.counts if k.startswith("n_"))
        rocs = sorted(self.histograms)
        if not names and not counts:
            return {}
        device = next(iter(self.counts.values())).device
        flat = torch.cat([torch.stack(
            [torch.as_tensor(self.sums[m], device=device) for m in names]
            + [torch.as_tensor(self.counts[m], device=device) for m in names]
            + [torch.as_tensor(self.counts[k], device=device) for k in counts]
        )] + [self.histograms[r].reshape(-1) for r in rocs])
        if reduce is not None:
            flat = reduce(flat)
        k, n = len(names), 2 * len(names) + len(counts)
        values = flat[:n].tolist()
        result = {m: values[i] / max(values[k + i], 1.0) for i, m in enumerate(names)}
        result.update({c: values[2 * k + i] for i, c in enumerate(counts)})
        for i, r in enumerate(rocs):
            result[r.removeprefix(ROC_PREFIX)] = auc_from_histogram(flat[n + i * 2 * ROC_BINS:
                                                                         n + (i + 1) * 2 * ROC_BINS].view(2, -1))
        return result


def weighted_loss(loss_parts: dict[str, tuple[str, float]], metrics: dict[str, float]) -> float:
    """The objective's loss from its logged part means: sum_p weight_p * metrics[p] (``Objective.loss_parts``)."""
    return sum(weight * metrics.get(part, 0.0) for part, (_, weight) in loss_parts.items())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` past ``step`` (a resumed run logs them again), atomically: a temporary
    file is written, then renamed over the log."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes one JSON object per log step to ``metrics.jsonl`` (appending: a resumed run continues the file),
    mirrors scalars to TensorBoard when enabled, and prints one progress line. Only the main process writes.
    ``resumed_at``: the step of the checkpoint resumed from; both logs are cut back to it first, so every step is
    logged once, in order (TensorBoard: ``purge_step``, which drops events at or after the step given)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, max_steps: int,
                 resumed_at: int | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and resumed_at is not None:
            truncate_metrics(self.path, resumed_at)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_at is None else resumed_at + 1
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict, prefix: str = "train"):
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"split": prefix, "time": round(time.time(), 3), **record}) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def progress(self, record: dict, seconds_per_step: float | None):
        if not self.enabled:
            return
        step = record["step"]
        parts = [f"step {step:>6}/{self.max_steps}"]
        parts += [f"{k} {record[k]:.4f}" for k in record if k.endswith("_loss") or k == "loss"]
        parts.append(f"lr {record['lr']:.2e}")
        if record.get("tok_per_s"):
            parts.append(f"{record['tok_per_s'] / 1e3:.1f}k tok/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if record.get("data_wait") is not None:
            parts.append(f"data {100 * record['data_wait']:.0f}%")
        if seconds_per_step:
            eta = seconds_per_step * (self.max_steps - step)
            parts.append(f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        print(" | ".join(parts), flush=True)

    def close(self):
        if self.writer is not None:
            self.writer.close()
