"""LR range test: python scripts/lr_find.py CONFIG.yaml [key.sub=value ...] [--min-lr 1e-7 --max-lr 1 --steps 100 --out DIR]"""

import sys

from pretrain.lr_find import main

if __name__ == "__main__":
    sys.exit(main())
