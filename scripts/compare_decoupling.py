"""Backprop vs local updates vs the frozen-random control, DESIGN.md §4 (pretrain/studies/decoupling.py):
python scripts/compare_decoupling.py [--config configs/tiny.yaml] [--steps 200] [--seeds 0]"""

import sys

from pretrain.studies.decoupling import main

if __name__ == "__main__":
    sys.exit(main())
