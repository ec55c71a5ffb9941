"""Evaluate an export of this toolkit with stock ``transformers`` classes: what did pretraining teach the encoder?

Three measurements, all with fixed seeds so that two exports are scored on exactly the same masks and splits:

* **MLM** (``masked_lm``): random-token masking of the held-out blocks as in pretraining (15% of non-special
  tokens, 80/10/10, ``get_objective("mlm", ...)`` seeded per block), scored with the export's MLM head.
* **Span infilling** (``span_infilling``): whole spans of 3-6 words replaced by [MASK] (several disjoint spans per
  block, about 15% of its tokens, never across [CLS]/[SEP]); every token of every span is predicted in one forward
  pass. Token accuracy and exact-span accuracy (all tokens of the span right). This is what SpanBERT trains for and
  what single-token MLM never sees.
* **Linear probe** (``linear_probe``): frozen encoder features (mean-pooled last layer, or [CLS]) → scikit-learn
  logistic regression on a labelled task, by default the WordNet supersense of a gloss (45 classes, DESIGN.md §7).
  Works for every encoder, including the ELECTRA discriminator, which has no MLM head.

Every loss and accuracy is token-exact: sums over all scored tokens divided by their count, never a mean of batch
means. ``evaluate_export(dir)`` runs what applies to the export (an ELECTRA run export with ``discriminator/`` and
``generator/`` gets both) and returns one JSON-ready dict; ``scripts/evaluate.py`` is its command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from objectives.span import span_infilling_spans, word_units

logger = logging.getLogger(__name__)

#: masks and splits of the evaluation are drawn from this seed (independent of any training seed)
EVAL_SEED = 1234
#: salt mixed into the span-infilling seed so its masks are independent of the MLM masks of the same block
SPAN_SALT = 0x5BA7
TASKS = ("mlm", "span", "probe")


# --------------------------------------------------------------------------- held-out blocks


@dataclass
class HeldOut:
    """Blocks to score and what they came from."""

    examples: list[dict]
    """``{"input_ids": LongTensor[L], "word_ids": LongTensor[L], "index": i}`` per block (index seeds the masks)."""
    unigram_probs: np.ndarray | None
    """[V] unigram distribution of the training split (special tokens 0), for the unigram baseline; None if unknown."""
    info: dict
    """Where the blocks came from (config/files, split, cache path, counts)."""


def find_run_config(export_dir: str | os.PathLike) -> Path | None:
    """The config an export was trained with: ``pretrain_config.yaml`` beside it or one level up (ELECTRA's
    ``export/generator``), else the run's ``config.yaml`` one or two levels up."""
    d = Path(export_dir).resolve()
    for candidate in (d / "pretrain_config.yaml", d.parent / "pretrain_config.yaml", d.parent / "config.yaml",
                      d.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def load_held_out(tokenizer, config: str | os.PathLike | None = None, data_files: Sequence[str] | None = None,
                  block_size: int = 128, max_blocks: int | None = None, cache_dir: str | None = None) -> HeldOut:
    """Held-out blocks tokenized with ``tokenizer`` (the export's).

    ``config``: a run's config.yaml; its validation split from ``prepare_blocks`` (the same cache the run used).
    ``data_files``: held-out text files (same formats as ``data.files``); all their blocks are used, tokenized with
    the export's tokenizer and cached under ``cache_dir``. ``max_blocks`` keeps the first N blocks."""
    from .config import config_from_dict, load_config
    from .data import prepare_blocks

    if (config is None) == (not data_files):
        raise ValueError("pass exactly one of a run config (--config RUN_DIR/config.yaml) or held-out --data-files")
    if config is not None:
        cfg = load_config(config)
        if cache_dir:
            cfg.data.cache_dir = cache_dir
        split = "validation"
    else:
        data = {"files": [str(f) for f in data_files], "block_size": block_size, "validation_fraction": 0.0}
        if cache_dir:
            data["cache_dir"] = cache_dir
        cfg = config_from_dict({"data": data, "tokenizer": {"path": str(tokenizer.name_or_path)},
                                "model": {"max_position_embeddings": max(block_size, 8)}})
        split = "train"  # validation_fraction 0: every block of the held-out files is in the "train" split
    prepared = prepare_blocks(cfg)
    if prepared.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the export's tokenizer differs from the one of {config}: evaluate an export with the data "
                         "of its own run (or pass --data-files to tokenize held-out text with the export's tokenizer)")
    blocks = getattr(prepared, split)
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    if n == 0:
        raise ValueError(f"no {split} blocks to evaluate in {prepared.cache_path} (raise data.validation_fraction or "
                         "pass larger --data-files)")
    examples = [dict(blocks[i], index=i) for i in range(n)]
    unigram = None
    if config is not None:
        counts = np.asarray(prepared.unigram_counts, dtype=np.float64).copy()
        counts[list(tokenizer.all_special_ids)] = 0.0
        unigram = counts / counts.sum() if counts.sum() > 0 else None
    info = {"source": str(config) if config is not None else [str(f) for f in data_files], "split": split,
            "cache": str(prepared.cache_path), "blocks": n, "blocks_available": len(blocks),
            "block_size": blocks.block_size}
    return HeldOut(examples, unigram, info)


# --------------------------------------------------------------------------- scoring masked positions


@torch.no_grad()
def score_masked(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Per-position cross-entropy (nats, fp32) and argmax correctness at the labelled positions of one batch.

    Returns ``(loss [B, L], correct [B, L] bool, selected [B, L] bool)``; unlabelled positions hold 0 / False."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    selected = labels != -100
    loss = torch.zeros(labels.shape, dtype=torch.float32)
    correct = torch.zeros(labels.shape, dtype=torch.bool)
    picked = logits[selected].float()
    targets = labels[selected]
    loss[selected] = F.cross_entropy(picked, targets, reduction="none")
    correct[selected] = picked.argmax(-1) == targets
    return loss, correct, selected


def unigram_baseline(unigram_probs: np.ndarray | None, targets: np.ndarray) -> dict:
    """Loss and accuracy of predicting the training unigram distribution (the plateau MLM training starts from)."""
    if unigram_probs is None or len(targets) == 0:
        return {}
    p = np.clip(unigram_probs[targets], 1e-12, None)
    return {"unigram_loss": float(-np.log(p).sum() / len(targets)),
            "unigram_acc": float((targets == int(np.argmax(unigram_probs))).sum() / len(targets))}


def masked_lm(model, tokenizer, held_out: HeldOut, seed: int = EVAL_SEED, batch_size: int = 32) -> dict:
    """Random-token MLM on the held-out blocks: 15% of non-special tokens, 80/10/10, masks seeded by (seed, block
    index) through ``get_objective("mlm", tokenizer, seed=seed)`` (the training collator). Token-exact."""
    from objectives import get_objective

    mlm = get_objective("mlm", tokenizer, seed=seed)
    loss_sum, n_correct, n_masked, targets = 0.0, 0, 0, []
    for start in range(0, len(held_out.examples), batch_size):
        batch = mlm.collate(held_out.examples[start:start + batch_size])
        loss, correct, selected = score_masked(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss_sum += float(loss[selected].double().sum())
        n_correct += int(correct.sum())
        n_masked += int(selected.sum())
        targets.append(batch["labels"][selected].numpy())
    out = {"loss": loss_sum / max(n_masked, 1), "acc": n_correct / max(n_masked, 1), "n_masked": n_masked,
           "blocks": len(held_out.examples)}
    out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 50 else None
    out.update(unigram_baseline(held_out.unigram_probs, np.concatenate(targets) if targets else np.zeros(0, int)))
    return out


# --------------------------------------------------------------------------- span infilling


def span_infilling_batch(examples: Sequence[dict], tokenizer, seed: int = EVAL_SEED, **span_options):
    """Mask the spans of each example with [MASK]. Returns (batch dict with ``input_ids``, ``attention_mask``,
    ``labels`` [B, L] (original ids on span tokens, -100 elsewhere), spans per example)."""
    special = np.zeros(len(tokenizer), dtype=bool)
    special[list(tokenizer.all_special_ids)] = True
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    all_spans = []
    for b, e in enumerate(examples):
        ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
        words = e["word_ids"]
        words = (words.long() if isinstance(words, torch.Tensor)
                 else torch.tensor([-1 if w is None else int(w) for w in words], dtype=torch.long))
        rng = np.random.default_rng([seed, SPAN_SALT, int(e.get("index", b))])
        spans = span_infilling_spans(ids.numpy(), words.numpy(), special, rng, **span_options)
        input_ids[b, :len(ids)] = ids
        attention[b, :len(ids)] = 1
        for s, t, _ in spans:
            labels[b, s:t] = ids[s:t]
            input_ids[b, s:t] = tokenizer.mask_token_id
        all_spans.append(spans)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, all_spans


def span_infilling(model, tokenizer, held_out: HeldOut, seed: int = EVAL_SEED, batch_size: int = 32,
                   min_words: int = 3, max_words: int = 6, ratio: float = 0.15) -> dict:
    """Span infilling on the held-out blocks: token accuracy and loss over all span tokens, exact-span accuracy
    over spans, and both per span length in words."""
    loss_sum, n_correct, n_tokens, n_candidates = 0.0, 0, 0, 0
    by_words = {w: [0, 0, 0, 0] for w in range(min_words, max_words + 1)}  # spans, exact, tokens, correct tokens
    special = np.zeros(len(tokenizer), dtype=bool)
    special[list(tokenizer.all_special_ids)] = True
    targets = []
    for start in range(0, len(held_out.examples), batch_size):
        chunk = held_out.examples[start:start + batch_size]
        batch, spans = span_infilling_batch(chunk, tokenizer, seed, min_words=min_words, max_words=max_words,
                                            ratio=ratio)
        loss, correct, selected = score_masked(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss_sum += float(loss[selected].double().sum())
        n_correct += int(correct.sum())
        n_tokens += int(selected.sum())
        targets.append(batch["labels"][selected].numpy())
        for b, block_spans in enumerate(spans):
            ids = np.asarray(chunk[b]["input_ids"])
            n_candidates += int((~special[ids]).sum())
            for s, t, w in block_spans:
                stats = by_words[w]
                stats[0] += 1
                stats[1] += int(correct[b, s:t].all())
                stats[2] += t - s
                stats[3] += int(correct[b, s:t].sum())
    n_spans = sum(v[0] for v in by_words.values())
    out = {"token_acc": n_correct / max(n_tokens, 1), "exact_span_acc": sum(v[1] for v in by_words.values())
           / max(n_spans, 1), "loss": loss_sum / max(n_tokens, 1), "n_tokens": n_tokens, "n_spans": n_spans,
           "masked_fraction": n_tokens / max(n_candidates, 1), "mean_span_tokens": n_tokens / max(n_spans, 1),
           "blocks": len(held_out.examples),
           "by_words": {str(w): {"spans": v[0], "exact_span_acc": v[1] / max(v[0], 1),
                                 "token_acc": v[3] / max(v[2], 1)} for w, v in by_words.items()}}
    base = unigram_baseline(held_out.unigram_probs, np.concatenate(targets) if targets else np.zeros(0, int))
    out.update(base)
    return out


# --------------------------------------------------------------------------- linear probe


def supersense_split(examples: Sequence[dict], n_train: int, n_test: int, seed: int = EVAL_SEED):
    """Seeded train/test split of labelled ``{"text", "label"}`` examples. Duplicate texts are dropped first (first
    occurrence kept) so that no test gloss also appears in training. Returns (train, test) lists."""
    seen, unique = set(), []
    for e in examples:
        if e["text"] not in seen:
            seen.add(e["text"])
            unique.append(e)
    if n_train + n_test > len(unique):
        raise ValueError(f"the probe needs {n_train} + {n_test} examples but only {len(unique)} distinct ones exist")
    order = np.random.default_rng([seed, len(unique)]).permutation(len(unique))
    return [unique[i] for i in order[:n_train]], [unique[i] for i in order[n_train:n_train + n_test]]


def read_labelled(path: str | os.PathLike) -> list[dict]:
    """A JSONL file of ``{"text": ..., "label": ...}`` lines (blank lines skipped): a probe task of one's own."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, H]: the mean over each text's tokens ([CLS] and [SEP] included)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def encode_texts(encoder, tokenizer, texts: Sequence[str], pooling: str = "mean", batch_size: int = 256,
                 max_length: int = 64) -> np.ndarray:
    """[N, H] float32 features of the encoder's last layer: the mean over the non-pad tokens (``mean``, [CLS] and
    [SEP] included) or the [CLS] state (``cls``). Texts are batched by length; the order of ``texts`` is kept."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    max_length = min(max_length, getattr(encoder.config, "max_position_embeddings", max_length))
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")
    features = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt", return_token_type_ids=False)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.float()
        pooled = hidden[:, 0] if pooling == "cls" else mean_pool(hidden, enc["attention_mask"])
        features[idx] = pooled.numpy()
    return features


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 C: float = 1.0, max_iter: int = 1000) -> dict:
    """Standardised features → multinomial logistic regression (lbfgs, L2, fixed C): test accuracy, macro-F1, the
    majority-class baseline and the binomial standard error of the accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(train_x, train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    pred = clf.predict(test_x)
    acc = float((pred == test_y).mean())
    labels, counts = np.unique(train_y, return_counts=True)
    majority = labels[np.argmax(counts)]
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(len(test_y), 1)),
            "macro_f1": float(f1_score(test_y, pred, average="macro", zero_division=0)),
            "majority_acc": float((test_y == majority).mean()), "n_train": int(len(train_y)),
            "n_test": int(len(test_y)), "classes": int(len(np.unique(np.concatenate([train_y, test_y])))),
            "C": C, "max_iter": max_iter, "converged": converged, "fit_seconds": round(time.perf_counter() - start, 2)}


def probe_encoder(encoder, tokenizer, train: Sequence[dict], test: Sequence[dict], pooling: str = "mean",
                  C: float = 1.0, max_iter: int = 1000, max_length: int = 64) -> dict:
    """Linear probe of a frozen ``encoder`` (a base model: BertModel / ElectraModel) on labelled examples."""
    start = time.perf_counter()
    encoder.eval()
    train_x = encode_texts(encoder, tokenizer, [e["text"] for e in train], pooling, max_length=max_length)
    test_x = encode_texts(encoder, tokenizer, [e["text"] for e in test], pooling, max_length=max_length)
    feature_seconds = time.perf_counter() - start
    out = linear_probe(train_x, np.array([e["label"] for e in train]), test_x, np.array([e["label"] for e in test]),
                       C=C, max_iter=max_iter)
    out.update(pooling=pooling, max_length=max_length, feature_seconds=round(feature_seconds, 2))
    return out


# --------------------------------------------------------------------------- whole exports


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = TASKS
    """Which of mlm, span, probe to run (those an export cannot do are skipped)."""
    seed: int = EVAL_SEED
    """Seed of the MLM masks, the span masks and the probe split."""
    batch_size: int = 32
    """Blocks per forward pass for mlm/span."""
    probe_train: int = 20_000
    """Probe training examples."""
    probe_test: int = 10_000
    """Probe test examples."""
    probe_pooling: str = "mean"
    """mean (over the gloss tokens) or cls."""
    probe_C: float = 1.0
    """Inverse L2 strength of the logistic regression (fixed: never tuned on the test split)."""
    probe_max_iter: int = 1000
    random_init: bool = False
    """Score a randomly initialised model of the export's configuration instead of its weights (the control)."""

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown evaluation tasks {unknown}; choose from {', '.join(TASKS)}")


def export_kind(export_dir: str | os.PathLike) -> str:
    """``mlm`` (a ForMaskedLM export), ``encoder`` (any other model, e.g. ElectraForPreTraining) or ``electra-run``
    (a directory holding ``discriminator/`` and ``generator/``)."""
    d = Path(export_dir)
    if not (d / "config.json").is_file():
        if (d / "discriminator" / "config.json").is_file() and (d / "generator" / "config.json").is_file():
            return "electra-run"
        raise FileNotFoundError(f"{d} holds no config.json: not a transformers export (nor an ELECTRA run export "
                                "with discriminator/ and generator/)")
    architectures = json.loads((d / "config.json").read_text()).get("architectures") or []
    return "mlm" if any(a.endswith("ForMaskedLM") for a in architectures) else "encoder"


def load_models(export_dir: str | os.PathLike, kind: str, random_init: bool, seed: int):
    """(MLM model or None, base encoder) loaded with the stock Auto classes, offline; ``random_init`` builds the
    same architecture from the config with weights drawn from ``seed`` instead."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModel
    if random_init:
        torch.manual_seed(seed)
        model = auto.from_config(AutoConfig.from_pretrained(str(export_dir)))
    else:
        model = auto.from_pretrained(str(export_dir))
    model.eval()
    return (model, model.base_model) if kind == "mlm" else (None, model)


def evaluate_export(export_dir: str | os.PathLike, options: EvalOptions | None = None, *, config=None,
                    data_files: Sequence[str] | None = None, block_size: int = 128, max_blocks: int | None = None,
                    cache_dir: str | None = None, probe_examples: Sequence[dict] | None = None,
                    _shared: dict | None = None) -> dict:
    """Evaluate one export directory; returns a JSON-ready dict (see the module docstring).

    The held-out blocks come from ``config`` (a run's config.yaml; default: the one found next to the export) or
    ``data_files``. ``probe_examples`` (``{"text", "label"}`` dicts) default to the WordNet supersense task of the
    demo corpus (fetched into ``cache_dir`` / the config's ``data.cache_dir`` on first use)."""
    from transformers import AutoTokenizer

    options = options or EvalOptions()
    export_dir = Path(export_dir)
    shared = {} if _shared is None else _shared
    kind = export_kind(export_dir)
    if config is None and not data_files:
        config = find_run_config(export_dir)
    if kind == "electra-run":
        kw = dict(config=config, data_files=data_files, block_size=block_size, max_blocks=max_blocks,
                  cache_dir=cache_dir, probe_examples=probe_examples, _shared=shared)
        return {"export": str(export_dir), "kind": kind,
                "generator": evaluate_export(export_dir / "generator", options, **kw),
                "discriminator": evaluate_export(export_dir / "discriminator", options, **kw)}

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    mlm_model, encoder = load_models(export_dir, kind, options.random_init, options.seed)
    n_params = sum(p.numel() for p in (mlm_model or encoder).parameters())
    result: dict[str, Any] = {
        "export": str(export_dir), "kind": kind, "model_class": type(mlm_model or encoder).__name__,
        "parameters": n_params, "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "hidden_size": encoder.config.hidden_size, "num_layers": encoder.config.num_hidden_layers,
        "random_init": options.random_init, "seed": options.seed,
    }
    wanted = set(options.tasks)
    if mlm_model is not None and wanted & {"mlm", "span"}:
        if config is None and not data_files:
            raise ValueError(f"no run config found next to {export_dir}: pass --config RUN_DIR/config.yaml or "
                             "--data-files for the MLM and span evaluations (or --tasks probe)")
        key = ("held_out", str(config), tuple(data_files or ()), block_size, max_blocks)
        if key not in shared:
            shared[key] = load_held_out(tokenizer, config, data_files, block_size, max_blocks, cache_dir)
        held_out = shared[key]
        result["data"] = held_out.info
        if "mlm" in wanted:
            result["mlm"] = masked_lm(mlm_model, tokenizer, held_out, options.seed, options.batch_size)
        if "span" in wanted:
            result["span_infilling"] = span_infilling(mlm_model, tokenizer, held_out, options.seed,
                                                      options.batch_size)
    if "probe" in wanted:
        if "probe_split" not in shared:
            examples = probe_examples
            task = "custom"
            if examples is None:
                from .data import wordnet_supersense

                if cache_dir is None and config is not None:
                    from .config import load_config

                    cache_dir = load_config(config).data.cache_dir
                examples = wordnet_supersense(cache_dir or "~/.cache/encoder-pretrain")
                task = "wordnet_supersense"
            shared["probe_split"] = (task, *supersense_split(examples, options.probe_train, options.probe_test,
                                                             options.seed))
        task, train, test = shared["probe_split"]
        result["probe"] = {"task": task, **probe_encoder(encoder, tokenizer, train, test, options.probe_pooling,
                                                         options.probe_C, options.probe_max_iter)}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


__all__ = [
    "EVAL_SEED", "EvalOptions", "HeldOut", "encode_texts", "evaluate_export", "export_kind", "find_run_config",
    "linear_probe", "load_held_out", "masked_lm", "probe_encoder", "score_masked", "span_infilling",
    "span_infilling_batch", "span_infilling_spans", "supersense_split", "word_units",
]


# --------------------------------------------------------------------------- command line (scripts/evaluate.py)


def main(argv=None) -> int:
    """Evaluate an export with stock transformers classes: held-out MLM loss/accuracy and span infilling (fixed seeded
    masks) and a linear probe of the frozen encoder on the WordNet supersense task. Prints one JSON object.

        python scripts/evaluate.py runs/tiny/export                       # the run's validation split, found beside it
        python scripts/evaluate.py runs/electra-tiny/export               # generator: mlm + span + probe; discriminator: probe
        python scripts/evaluate.py EXPORT --config RUN_DIR/config.yaml --blocks 512
        python scripts/evaluate.py EXPORT --data-files heldout/*.txt      # your own held-out text, export's tokenizer
        python scripts/evaluate.py EXPORT --tasks probe --probe-data labelled.jsonl   # {"text", "label"} per line
        python scripts/evaluate.py EXPORT --random-init                   # the control: same architecture, random weights
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    probe_examples = None
    if args.probe_data:
        probe_examples = read_labelled(args.probe_data)
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

