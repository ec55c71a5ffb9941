"""Load a run's export through stock transformers in this fresh process and show what pretraining bought:
top predictions for masked sentences and held-out MLM loss/accuracy of the trained model vs an untrained one.

    python scripts/demo_check.py runs/tiny [--blocks 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

SENTENCES = [
    "And God said, Let there be [MASK]: and there was light.",
    "The [MASK] of the Lord is my shepherd.",
    "This module provides a [MASK] for reading and writing files.",
    "The function returns a list of [MASK].",
    "A large body of salt [MASK] that covers most of the earth.",
]


@torch.no_grad()
def heldout_mlm(model, batches) -> tuple[float, float]:
    """Token-exact masked-token cross-entropy and accuracy over fixed validation masks (HF's dense forward)."""
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sel = batch["labels"] != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel], reduction="sum").item()
        correct += int((logits[sel].argmax(-1) == batch["labels"][sel]).sum())
        count += int(sel.sum())
    return loss_sum / count, correct / count


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks to score")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, pipeline

    from objectives import get_objective
    from pretrain.config import load_config
    from pretrain.data import prepare_blocks

    export = os.path.join(args.run_dir, "export")
    if not os.path.isdir(export):
        print(f"error: {export} does not exist; run scripts/pretrain.py first", file=sys.stderr)
        return 2
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(export)
    trained = AutoModelForMaskedLM.from_pretrained(export).eval()
    print(f"loaded {type(trained).__name__} + {type(tokenizer).__name__} from {export} "
          f"({sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)})")

    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    validation = prepare_blocks(cfg).validation
    mlm = get_objective("mlm", tokenizer, seed=1234)
    examples = [dict(validation[i], index=i) for i in range(min(args.blocks, len(validation)))]
    batches = [mlm.collate(examples[i:i + 16]) for i in range(0, len(examples), 16)]
    torch.manual_seed(cfg.train.seed)
    untrained = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(export)).eval()
    before = heldout_mlm(untrained, batches)
    after = heldout_mlm(trained, batches)

    fill = pipeline("fill-mask", model=trained, tokenizer=tokenizer, device=-1, top_k=5)
    print("\ntop-5 predictions of the exported model:")
    for sentence in SENTENCES:
        guesses = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(sentence))
        print(f"  {sentence}\n      -> {guesses}")
    n_masked = sum(int((b["labels"] != -100).sum()) for b in batches)
    print(f"\nheld-out MLM on {len(examples)} validation blocks ({n_masked} masked tokens, fixed masks):")
    print(f"  untrained: loss {before[0]:.3f} (perplexity {math.exp(before[0]):.0f}), accuracy {before[1]:.3f}")
    print(f"  trained:   loss {after[0]:.3f} (perplexity {math.exp(after[0]):.0f}), accuracy {after[1]:.3f}")
    print(json.dumps({"before_loss": round(before[0], 4), "before_acc": round(before[1], 4),
                      "after_loss": round(after[0], 4), "after_acc": round(after[1], 4),
                      "seconds": round(time.time() - start, 1)}))
    return 0

