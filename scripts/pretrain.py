"""Pretrain an encoder: python scripts/pretrain.py CONFIG.yaml [key.sub=value ...] [--overwrite]"""

import os
import sys

# this file's name would shadow the `pretrain` package: drop its own folder from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from pretrain.cli import pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
