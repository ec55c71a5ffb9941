"""Evaluate an export with stock transformers classes: held-out MLM loss/accuracy and span infilling (fixed seeded
masks) and a linear probe of the frozen encoder on the WordNet supersense task. Prints one JSON object.

    python scripts/evaluate.py runs/tiny/export                       # the run's validation split, found beside it
    python scripts/evaluate.py runs/electra-tiny/export               # generator: mlm + span + probe; discriminator: probe
    python scripts/evaluate.py EXPORT --config RUN_DIR/config.yaml --blocks 512
    python scripts/evaluate.py EXPORT --data-files heldout/*.txt      # your own held-out text, export's tokenizer
    python scripts/evaluate.py EXPORT --tasks probe --probe-data labelled.jsonl   # {"text", "label"} per line
    python scripts/evaluate.py EXPORT --random-init                   # the control: same architecture, random weights

See pretrain/evaluation.py for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# scripts/pretrain.py would shadow the `pretrain` package: drop this folder from the import path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    from pretrain.evaluation import EVAL_SEED, TASKS, EvalOptions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="an export directory (or an ELECTRA run's export/ with both models)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="the run's config.yaml: its validation split is scored (default: the config "
                                         "found beside the export)")
    source.add_argument("--data-files", nargs="+", help="held-out text files to score instead (all their blocks)")
    parser.add_argument("--block-size", type=int, default=128, help="block size for --data-files")
    parser.add_argument("--blocks", type=int, default=None, help="score the first N held-out blocks (default: all)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the masks and of the probe split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe-train", type=int, default=20_000)
    parser.add_argument("--probe-test", type=int, default=10_000)
    parser.add_argument("--probe-pooling", choices=["mean", "cls"], default="mean")
    parser.add_argument("--probe-C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--probe-data", help="JSONL of {\"text\", \"label\"} to probe instead of WordNet supersenses")
    parser.add_argument("--cache-dir", help="cache for blocks and the demo corpus (default: the config's)")
    parser.add_argument("--random-init", action="store_true",
                        help="score a randomly initialised model of the export's configuration (control)")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)

    import transformers

    from pretrain.evaluation import evaluate_export

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    probe_examples = None
    if args.probe_data:
        with open(args.probe_data, encoding="utf-8") as f:
            probe_examples = [json.loads(line) for line in f if line.strip()]
    try:
        options = EvalOptions(tasks=tuple(args.tasks), seed=args.seed, batch_size=args.batch_size,
                              probe_train=args.probe_train, probe_test=args.probe_test,
                              probe_pooling=args.probe_pooling, probe_C=args.probe_C, random_init=args.random_init)
        result = evaluate_export(args.export_dir, options, config=args.config, data_files=args.data_files,
                                 block_size=args.block_size, max_blocks=args.blocks, cache_dir=args.cache_dir,
                                 probe_examples=probe_examples)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
