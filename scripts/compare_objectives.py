"""MLM vs SpanBERT vs ELECTRA on the demo corpus, each export scored (pretrain/studies/objectives.py):
python scripts/compare_objectives.py [--steps 1500] [--out runs/compare] [--results benchmarks]"""

import sys

from pretrain.studies.objectives import main

if __name__ == "__main__":
    sys.exit(main())
