"""Load a run's export through stock transformers in a fresh process (pretrain/studies/demo_check.py):
python scripts/demo_check.py runs/tiny [--blocks 64]"""

import sys

from pretrain.studies.demo_check import main

if __name__ == "__main__":
    sys.exit(main())
