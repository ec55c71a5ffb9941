"""BERT vs RoBERTa vs ModernBERT (and SpanBERT, ELECTRA on ModernBERT) on the demo corpus, each export scored
(pretrain/studies/archs.py): python scripts/compare_archs.py [--steps 1500] [--out runs/compare-archs]"""

import sys

from pretrain.studies.archs import main

if __name__ == "__main__":
    sys.exit(main())
