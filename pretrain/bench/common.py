"""What every benchmark suite shares: model presets, a stand-in tokenizer, random blocks, the environment a row
records, timing, and where results go."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import time
from pathlib import Path

PRESETS = {
    # name: (hidden, layers, heads, intermediate, vocab, embedding_size)
    "tiny": (64, 2, 2, 256, 1000, None),
    "compare-cpu": (128, 2, 2, 512, 8192, None),  # the models of scripts/compare_objectives.py
    "bert-base": (768, 12, 12, 3072, 30522, None),
    "electra-small": (256, 12, 4, 1024, 30522, 128),
}


class RandomTokenizer:
    """Just what an objective needs from a tokenizer: size and special ids (BERT layout: PAD 0, UNK 1, CLS 2,
    SEP 3, MASK 4)."""

    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3, 4
    all_special_ids = [0, 1, 2, 3, 4]

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Made-up tokens, every one a word start (no "##" pieces)."""
        return {f"t{i}": i for i in range(self.vocab_size)}


def random_blocks(n: int, batch: int, seq: int, vocab: int) -> list[list[dict]]:
    """``n`` micro-batches of ``batch`` random blocks [CLS] ... [SEP] with their stream indices."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [[{"input_ids": [2, *torch.randint(5, vocab, (seq - 2,), generator=gen).tolist(), 3],
              "index": t * batch + i} for i in range(batch)] for t in range(n)]


def environment(device_arg: str) -> dict:
    """Device, CPU, load and versions: recorded in every row (only same-run ratios compare across machines)."""
    import torch
    import transformers

    device = torch.cuda.get_device_name() if device_arg != "cpu" and torch.cuda.is_available() else "cpu"
    return {"device": device, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def seconds_per_step(step, batches: list, steps: int, device) -> float:
    """Wall time of ``steps`` calls of ``step`` over ``batches`` (cycled) divided by ``steps``; CUDA is
    synchronised before the clock starts and before it stops."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        step(batches[s % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_out(suite: str) -> Path:
    """``benchmarks/<suite>-<date>.json`` under the working directory (the repository root in ``make bench``)."""
    return Path("benchmarks") / f"{suite}-{datetime.date.today().isoformat()}.json"
