"""Plot runs' metrics.jsonl: python scripts/plot.py RUN_DIR [RUN_DIR ...] --out FILE.png [--x step|tokens]"""

import sys

from pretrain.plots import main

if __name__ == "__main__":
    sys.exit(main())
