"""Tokenize and pack a corpus into cached blocks: python scripts/prepare_data.py CONFIG.yaml [key.sub=value ...]

Runs the data half of a training run (corpus -> tokenizer -> packed train/validation blocks in ``data.cache_dir``)
and prints a JSON summary. A later ``scripts/pretrain.py`` with the same data settings loads the blocks from the cache.
"""

import os
import sys

# scripts/pretrain.py would shadow the `pretrain` package: drop this folder from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from pretrain.cli import prepare_data_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare_data_main())
