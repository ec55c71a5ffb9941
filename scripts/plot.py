"""Plot runs' metrics.jsonl: python scripts/plot.py RUN_DIR [RUN_DIR ...] --out FILE.png [--x step|tokens]"""

import os
import sys

# this folder holds scripts/pretrain.py, which would shadow the `pretrain` package: drop it from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from pretrain.plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
