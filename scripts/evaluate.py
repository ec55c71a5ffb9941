"""Evaluate an export with stock transformers classes (pretrain/evaluation.py; --help lists the forms):
python scripts/evaluate.py EXPORT_DIR [--config RUN_DIR/config.yaml] [--tasks mlm span probe]"""

import sys

from pretrain.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
