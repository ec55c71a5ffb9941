"""Tokenize and pack a corpus into cached blocks: python scripts/prepare_data.py CONFIG.yaml [key.sub=value ...]

Runs the data half of a training run (corpus -> tokenizer -> packed train/validation blocks in ``data.cache_dir``)
and prints a JSON summary. A later ``scripts/pretrain.py`` with the same data settings loads the blocks from the cache.
"""

import sys

from pretrain.cli import prepare_data_main

if __name__ == "__main__":
    sys.exit(prepare_data_main())
