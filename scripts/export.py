"""Export a run's checkpoint: python scripts/export.py RUN_DIR [--checkpoint DIR] [--out DIR]"""

import sys

from pretrain.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
