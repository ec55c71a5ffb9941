"""LR range test: python scripts/lr_find.py CONFIG.yaml [key.sub=value ...] [--min-lr 1e-7 --max-lr 1 --steps 100 --out DIR]"""

import os
import sys

# this folder holds scripts/pretrain.py, which would shadow the `pretrain` package: drop it from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from pretrain.lr_find import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
