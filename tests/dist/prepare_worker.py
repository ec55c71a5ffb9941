"""One process of a launch whose processes all prepare the same data cache at once, as the nodes of a job sharing
one cache folder do (no barrier, no main-process-first): records whether it trained the tokenizer or built the
blocks, and a digest of what it read. Usage: prepare_worker.py CONFIG OUT_DIR."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

import pretrain.data.blocks as blocks
import pretrain.data.tokenizer as tokenizer
from pretrain.config import load_config


def counting(module, name: str, counts: dict):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def main(config: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    counts = {"_build": 0, "train_wordpiece": 0}
    counting(blocks, "_build", counts)
    counting(tokenizer, "train_wordpiece", counts)
    data = blocks.prepare_blocks(load_config(config))
    digest = hashlib.sha256(np.ascontiguousarray(data.train.input_ids).tobytes()
                            + np.ascontiguousarray(data.validation.input_ids).tobytes()).hexdigest()
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({**counts, "digest": digest}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
