"""Load a run's export through stock transformers in this fresh process and show what pretraining bought, next to
an untrained model of the same shape: the rank of the true word in probe sentences, and over held-out blocks the
masked-token loss, accuracy, top-10 rate and median rank of the true token.

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

#: (sentence with one [MASK], the word it hides): collocations frequent in the demo corpus (KJV: "children of
#: Israel" 647 times, "thus saith the LORD" 415, "spake unto Moses" 111; pydoc: "return a list of" 84; GCIDE:
#: "a genus of plants" 68), so that a few CPU minutes of pretraining can learn them
PROBES = [
    ("And the children of [MASK] did evil in the sight of the LORD.", "israel"),
    ("Thus saith the [MASK], Behold, I will bring evil upon this place.", "lord"),
    ("And the LORD spake unto [MASK], saying, Speak unto the children of Israel.", "moses"),
    ("Return a [MASK] of all the keys in the dictionary.", "list"),
    ("A genus of [MASK] having opposite leaves and small flowers.", "plants"),
]


def true_token_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (1 = top) of each target among its row's logits: 1 + the number of strictly higher logits.
    logits [N, V], targets [N] -> [N] long."""
    return (logits > logits.gather(1, targets[:, None])).sum(1) + 1


@torch.no_grad()
def heldout_mlm(model, batches) -> dict:
    """Over fixed validation masks (HF's dense forward): token-exact masked-token cross-entropy ``loss``,
    ``accuracy``, ``top10`` (share of true tokens among the 10 highest logits) and ``median_rank``."""
    loss_sum, ranks = 0.0, []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sel = batch["labels"] != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel], reduction="sum").item()
        ranks.append(true_token_ranks(logits[sel], batch["labels"][sel]))
    ranks = torch.cat(ranks)
    return {"loss": loss_sum / len(ranks), "accuracy": float((ranks == 1).double().mean()),
            "top10": float((ranks <= 10).double().mean()), "median_rank": int(ranks.median())}


@torch.no_grad()
def probe(models: dict, tokenizer, sentence: str, answer: str, top_k: int = 3) -> dict:
    """The rank of ``answer`` at the sentence's [MASK] under each model of ``models`` (name -> MaskedLM), and the
    last model's ``top_k`` words; ``rank`` is None for an answer that is not one token of this vocabulary."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    enc = tokenizer(sentence, return_tensors="pt")
    position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
    result = {"sentence": sentence, "answer": answer, "rank": {}}
    for name, model in models.items():
        logits = model(**enc).logits[0, position]
        result["rank"][name] = (int(true_token_ranks(logits[None], torch.tensor(answer_ids[:1]))[0])
                                if len(answer_ids) == 1 else None)
        result["top"] = tokenizer.convert_ids_to_tokens(logits.topk(top_k).indices.tolist())
    return result


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks to score")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

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
    before, after = heldout_mlm(untrained, batches), heldout_mlm(trained, batches)

    print(f"\nrank of the hidden word among the {len(tokenizer)} tokens (1 = top prediction), untrained -> trained:")
    probes = [probe({"untrained": untrained, "trained": trained}, tokenizer, s, a) for s, a in PROBES]
    for p in probes:
        ranks = p["rank"]
        shown = (f"{ranks['untrained']} -> {ranks['trained']}" if ranks["trained"] is not None
                 else "not one token of this vocabulary")
        print(f"  {p['sentence']}\n      {p['answer']}: {shown}   (trained top 3: {', '.join(p['top'])})")
    n_masked = sum(int((b["labels"] != -100).sum()) for b in batches)
    print(f"\nheld-out MLM on {len(examples)} validation blocks ({n_masked} masked tokens, fixed masks):")
    for name, m in (("untrained", before), ("trained", after)):
        print(f"  {name + ':':10} loss {m['loss']:.3f} (perplexity {math.exp(m['loss']):.0f}), accuracy "
              f"{m['accuracy']:.3f}, true token in the top 10 {m['top10']:.1%}, median rank {m['median_rank']}")
    print(json.dumps({"before": {k: round(v, 4) for k, v in before.items()},
                      "after": {k: round(v, 4) for k, v in after.items()},
                      "probe_ranks": {p["answer"]: p["rank"] for p in probes},
                      "seconds": round(time.time() - start, 1)}))
    return 0
