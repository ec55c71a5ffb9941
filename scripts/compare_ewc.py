"""EWC continued pretraining, bible -> pydoc (pretrain/studies/ewc.py):
OMP_NUM_THREADS=1 python scripts/compare_ewc.py --threads 1"""

import sys

from pretrain.studies.ewc import main

if __name__ == "__main__":
    sys.exit(main())
