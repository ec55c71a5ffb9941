"""Fine-tune an export for sequence classification with the HF Trainer:
python scripts/finetune.py --model EXPORT_DIR (--train FILE --eval FILE | --dataset NAME | --task bbc|supersense)"""

import sys

from pretrain.finetune import main

if __name__ == "__main__":
    sys.exit(main())
