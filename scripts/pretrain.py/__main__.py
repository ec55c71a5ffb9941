"""Pretrain an encoder: python scripts/pretrain.py CONFIG.yaml [key.sub=value ...] [--overwrite]

``scripts/pretrain.py`` is a directory holding this ``__main__.py``: Python runs it by that path, and the import
system never takes a directory named ``pretrain.py`` for a module, so it cannot shadow the ``pretrain`` package.
"""

import sys

from pretrain.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
