"""The ``e2e`` suite (DESIGN.md §6): the whole trainer (``fit``: DataLoader workers masking, the loop, metrics)
against its own step (the same strategy, built the same way) on pre-collated batches of the same blocks."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from .common import PRESETS, environment, seconds_per_step


def write_zipf_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """One document per line of made-up words drawn from a Zipf law over 20k word types (realistic token lengths
    and frequencies for the tokenizer, packing and masking; the content is meaningless)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20_000)]
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(words[i] for i in rng.choice(len(words), size=rng.integers(100, 400), p=probs)) + "\n")
    return path


def suite_e2e(args) -> list[dict]:
    """``fit`` runs 2 x ``--steps`` steps logging every ``--steps``: its second window's tok/s (warm-up and
    compilation fall in the first) is the end-to-end figure; ``ratio`` = end-to-end / pure step (target >= 0.95)."""
    import torch

    from pretrain.config import config_from_dict
    from pretrain.data import prepare_blocks
    from pretrain.fast import fast_enabled
    from pretrain.steps import build_step
    from pretrain.trainer import fit, setup

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    env = environment(args.device)
    hidden, layers, heads, intermediate, vocab, embedding = PRESETS[args.preset]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        corpus = write_zipf_corpus(Path(tmp) / "corpus.txt", args.documents)
        for objective_name in args.objective:
            cfg = config_from_dict({
                "output_dir": f"{tmp}/run-{objective_name}",
                "data": {"files": [str(corpus)], "block_size": args.seq, "validation_fraction": 0.01,
                         "num_workers": args.workers, "cache_dir": f"{tmp}/cache"},
                "tokenizer": {"vocab_size": vocab},
                "model": {"hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                          "intermediate_size": intermediate, "max_position_embeddings": max(512, args.seq),
                          "embedding_size": embedding, "fast": args.fast},
                "objective": {"name": objective_name, "mlm": {"static_count": True}},
                "train": {"micro_batch_size": args.batch, "max_steps": 2 * args.steps, "lr": 1e-4,
                          "warmup_steps": 0, "eval_every": 0, "eval_batches": 1, "save_every": 0,
                          "log_every": args.steps, "device": device.type,
                          "precision": "bf16" if device.type == "cuda" else "fp32"},
                "log": {"tensorboard": False},
            })
            fit(cfg)
            records = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl")]
            e2e = [r for r in records if r.get("split") == "train"][-1]

            step_runner = build_step(cfg)  # the pure step: the same strategy on the cache fit() built
            data, _, _, collator, _ = setup(cfg, step_runner, Path(tmp), prepare_blocks(cfg))
            batches = [collator.collate([dict(data.train[(t * args.batch + i) % len(data.train)],
                                              index=t * args.batch + i) for i in range(args.batch)])
                       for t in range(8)]
            counter = iter(range(10 ** 9))

            def step(batch):
                step_runner.train_step([batch], cfg.train.lr, next(counter))

            for t in range(args.steps):  # warm-up, as fit's first window
                step(batches[t % len(batches)])
            times = [seconds_per_step(step, batches, args.steps, device) for _ in range(args.repeat)]
            pure = args.batch * args.seq / statistics.median(times)
            row = {"suite": "e2e", "objective": objective_name, "preset": args.preset, "seq": args.seq,
                   "batch": args.batch, "workers": args.workers, "precision": cfg.train.precision,
                   "fast": fast_enabled(cfg.model, device), "e2e_tok_per_s": e2e["tok_per_s"],
                   "e2e_data_wait": e2e["data_wait"], "pure_step_tok_per_s": pure,
                   "ratio": e2e["tok_per_s"] / pure, "threads": args.threads, **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows
