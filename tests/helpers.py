"""Small builders shared by tests: a WordPiece tokenizer trained in-process and random packed blocks."""

from __future__ import annotations

import random


WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly box jovial nymphs under "
         "bright stars and distant mountains river valley encoder pretraining objective language model "
         "masked span boundary generator discriminator gradient chunk layer").split()


def toy_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + (rng.choice(["", "s", "ing", "ed"]) if rng.random() < 0.3 else "")
                     for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]


def make_tokenizer():
    """A BertTokenizerFast over a fixed WordPiece vocabulary (deterministic: every process builds the same one)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    pieces = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
              + ["##" + c for c in string.ascii_lowercase] + sorted(set(WORDS)) + ["##s", "##ing", "##ed", "."])
    pieces = list(dict.fromkeys(pieces))  # drop duplicates (e.g. "##s") so ids are contiguous
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def packed_examples(tokenizer, n: int, length: int = 64, seed: int = 0) -> list[dict]:
    """``n`` packed blocks ``[CLS] … [SEP]`` with block-local word ids (-1 at specials), from the toy corpus."""
    stream, words = [], []
    word = 0
    for doc in toy_corpus(n_docs=4 * n * length // 40 + 10, seed=seed):
        enc = tokenizer(doc, add_special_tokens=False)
        stream += enc["input_ids"] + [tokenizer.sep_token_id]
        words += [word + w for w in enc.word_ids()] + [None]
        word += max(w for w in enc.word_ids()) + 1
    examples = []
    inner = length - 2
    for i in range(n):
        ids = stream[i * inner:(i + 1) * inner]
        wid = words[i * inner:(i + 1) * inner]
        base = min(w for w in wid if w is not None)
        examples.append({
            "input_ids": [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id],
            "word_ids": [-1] + [-1 if w is None else w - base for w in wid] + [-1],
        })
    return examples


def tiny_model_config(**overrides):
    from pretrain.config import ModelConfig

    base = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def write_tiny_config(path, corpus, cache, **train):
    """A YAML config at ``path`` for a 2 x 32 BERT on ``corpus/*.txt`` (blocks of 32, vocab 200, CPU, no
    TensorBoard, run in ``path.parent / "run"``); ``train`` overrides the train section."""
    import yaml

    cfg = {
        "output_dir": str(path.parent / "run"),
        "data": {"files": [str(corpus / "*.txt")], "block_size": 32, "validation_fraction": 0.1,
                 "cache_dir": str(cache), "num_workers": 0},
        "tokenizer": {"vocab_size": 200},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 64},
        "train": {"micro_batch_size": 4, "max_steps": 8, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                  "eval_every": 0, "eval_batches": 1, "device": "cpu", **train},
        "log": {"tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_config_rejected(tree: dict, message: str) -> None:
    """A config with a 4-layer model, a corpus and ``tree`` merged in fails with a ConfigError matching ``message``."""
    import pytest

    from pretrain.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"files": ["x.txt"]}, "model": {"num_layers": 4}, **tree})


def train_records(run) -> dict[int, dict]:
    """Last train record per step of a run's metrics.jsonl (a resumed run re-logs the steps it redoes)."""
    import json
    from pathlib import Path

    records = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            records[rec["step"]] = rec
    return records


class Planted:
    """A malicious checkpoint payload: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def packed_batch(tokenizer, objective, padded: bool):
    """``objective``'s batch of 3 packed blocks of 32 tokens; ``padded``: the last one cut to 20 (padding, a mask)."""
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tokenizer, 3, length=32))]
    if padded:
        examples[-1] = {k: (v[:20] if isinstance(v, list) else v) for k, v in examples[-1].items()}
    batch = objective.collate(examples)
    assert batch["padded"] is padded
    return batch


def gradients(model, loss) -> dict:
    """name -> gradient of ``loss`` for every parameter of ``model`` that gets one (left zeroed afterwards)."""
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def probes_both_routes(cfg, tokenizer):
    """(chunked, stitched) probe accuracies of one 2-chunk simulated model of ``cfg`` (``train.probe`` set): chunk by
    chunk through the pipeline, and layer by layer through the stitched model; also the built model."""
    import torch

    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.probe import build_probe, probe_layers

    torch.manual_seed(0)
    model, _ = build_chunked_model(cfg, tokenizer)
    pipeline = Pipeline(model, cfg, Layout("simulated", 2, 1, 0), torch.device("cpu"))
    pipeline.probe = probe = build_probe(cfg, model.objective, tokenizer, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        chunked = pipeline._probe_chunk_outputs()
    return chunked, probe_layers(probe, model.objective, model.model, "all"), model, probe


def worker_run(output_dir, overrides, monkeypatch) -> dict[int, dict]:
    """``tests/dist/decouple_worker.main`` in this process (in-memory blocks of 32 tokens, 4 layers), one thread like
    the torchrun workers, without the fresh-process export check; returns its train records by step."""
    import sys
    from pathlib import Path

    import torch

    dist = str(Path(__file__).parent / "dist")
    if dist not in sys.path:
        sys.path.insert(0, dist)
    import decouple_worker

    monkeypatch.setenv("SKIP_ROUNDTRIP", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decouple_worker.main(str(output_dir), overrides)
    finally:
        torch.set_num_threads(threads)
    return train_records(output_dir)

