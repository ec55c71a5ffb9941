"""Fine-tune an export for sequence classification with the HF Trainer:
python scripts/finetune.py --model EXPORT_DIR (--train FILE --eval FILE | --dataset NAME | --task bbc|supersense)"""

import os
import sys

# this folder holds scripts/pretrain.py, which would shadow the `pretrain` package: drop it from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

from pretrain.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
