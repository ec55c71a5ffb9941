"""Pretrain an encoder: python scripts/pretrain.py CONFIG.yaml [key.sub=value ...] [--overwrite]"""

import sys

from pretrain.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
