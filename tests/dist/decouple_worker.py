"""Run ``fit`` on in-memory toy blocks (no corpus, no data cache), alone or under torchrun.

usage: decouple_worker.py TESTS_DIR OUTPUT_DIR [key.sub=value ...]
The base config is a tiny 4-layer MLM BERT, dropout 0; overrides are dotted keys as on the pretrain command line.
``SLOW_FETCH_S`` (env) sleeps that long per block read, to give a test time to kill the run mid-way;
``SKIP_ROUNDTRIP=1`` skips the fresh-process load of the export (≈10 s of imports; tests that need it call
``roundtrip_check`` themselves).
"""

import os
import sys
import time
import types

sys.path.insert(0, sys.argv[1])
from helpers import make_tokenizer, packed_examples  # noqa: E402

from pretrain.config import config_from_dict  # noqa: E402
from pretrain.config_io import parse_overrides, set_dotted  # noqa: E402
import pretrain.export  # noqa: E402
from pretrain.trainer import fit  # noqa: E402


class SlowBlocks(list):
    def __getitem__(self, i):
        time.sleep(float(os.environ.get("SLOW_FETCH_S", "0")))
        return super().__getitem__(i)


def base_config(output_dir: str) -> dict:
    return {
        "output_dir": output_dir,
        "data": {"files": ["in-memory"], "block_size": 32, "num_workers": 0},
        "model": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 6, "lr": 2e-3, "warmup_steps": 2,
                  "save_every": 2, "log_every": 1, "eval_every": 3, "eval_batches": 2, "device": "cpu"},
        "decouple": {"mode": "local", "chunks": 2},
        "log": {"tensorboard": False},
    }


def skip_roundtrip(*args, **kwargs):
    return {"class": "(skipped)", "max_abs_err": 0.0}


def main(output_dir: str, overrides: list[str]):
    if os.environ.get("SKIP_ROUNDTRIP") == "1":
        pretrain.export.roundtrip_check = skip_roundtrip
    tree = base_config(output_dir)
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    tok = make_tokenizer()
    blocks = packed_examples(tok, 72, length=32)
    data = types.SimpleNamespace(tokenizer=tok, train=SlowBlocks(blocks[:64]), validation=blocks[64:],
                                 unigram_counts=None)
    fit(cfg, data=data)


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3:])
