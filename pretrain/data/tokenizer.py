"""The tokenizer: an existing one (``tokenizer.path``) or a WordPiece vocabulary trained on the corpus and cached.

A trained tokenizer is built with the ``tokenizers`` library exactly like bert-base-uncased's (BERT normaliser, BERT
pre-tokenizer, WordPiece with ``##`` continuation pieces, ``[CLS] $A [SEP]`` post-processor), wrapped as a
``transformers`` fast ``BertTokenizer`` and saved under ``{cache_dir}/tokenizers/{key}/`` where the key hashes the
corpus fingerprint and the tokenizer settings; the next call loads it back with ``AutoTokenizer.from_pretrained``.
(Never ``BertTokenizer(vocab_file=...)``: transformers v5 ignores that argument and builds an empty vocabulary.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from datasets import Dataset

from .corpus import corpus_fingerprint, expand_cache_dir, load_corpus
from .lock import build_lock
from .progress import Progress

logger = logging.getLogger(__name__)

#: bump when the trained tokenizer changes for the same corpus and settings
TOKENIZER_FORMAT_VERSION = 2
#: in this order, so [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4 (pretraining blocks are never padded;
#: fine-tuning batches are)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: characters of text the WordPiece trainer reads at most (a seeded sample of documents beyond that): 10 M characters
#: train an 8k vocabulary in 6-12 s on 2 cores (20 M: ~18 s), and are plenty for vocabularies of this size
TRAIN_MAX_CHARS = 10_000_000
TRAIN_BATCH_DOCS = 1000


def get_tokenizer(tok_cfg, data_cfg, corpus: Dataset | Callable[[], Dataset] | None = None):
    """The tokenizer for this run: ``tokenizer.path`` if set, else the cached (or newly trained) WordPiece vocab.

    ``corpus`` (a Dataset with a ``text`` column, or a function returning it) is only read when a vocabulary must be
    trained; by default ``load_corpus(data_cfg)``.
    """
    if tok_cfg.path:
        return load_pretrained_tokenizer(tok_cfg.path)
    key = tokenizer_cache_key(tok_cfg, data_cfg)
    out = expand_cache_dir(data_cfg) / "tokenizers" / key
    with build_lock(out, "tokenizer"):  # trained once per cache, whichever processes or machines share it
        if (out / "tokenizer.json").exists():
            logger.info("tokenizer: reusing %s", out)
            return load_pretrained_tokenizer(out)
        if corpus is None:
            corpus = load_corpus(data_cfg)
        elif callable(corpus) and not isinstance(corpus, Dataset):
            corpus = corpus()
        start = time.perf_counter()
        tokenizer = train_wordpiece(corpus, tok_cfg.vocab_size, tok_cfg.lowercase, tok_cfg.min_frequency)
        logger.info("tokenizer: trained a %d-token WordPiece vocab in %.1fs", len(tokenizer),
                    time.perf_counter() - start)
        _save_atomically(tokenizer, out, {"corpus_fingerprint": corpus_fingerprint(data_cfg), **_settings(tok_cfg)})
    return load_pretrained_tokenizer(out)


def tokenizer_cache_key(tok_cfg, data_cfg) -> str:
    state = {"corpus": corpus_fingerprint(data_cfg), **_settings(tok_cfg)}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """Identifies a fast tokenizer by its serialised pipeline and vocabulary (for the block cache key)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]


def load_pretrained_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)``, checked to be a fast tokenizer with [CLS]/[SEP]/[PAD]/[MASK]."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"tokenizer.path '{path}': cannot load a tokenizer ({type(e).__name__}: {e}); point it at a directory "
            "written by save_pretrained (with tokenizer.json), or set tokenizer.path: null to train one"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer.path '{path}' gives a slow {type(tokenizer).__name__}; word ids need a fast tokenizer "
            "(a directory with tokenizer.json)"
        )
    roles = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]"}
    missing = [f"{name} ({bert})" for name, bert in roles.items() if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise ValueError(
            f"tokenizer.path '{path}' has no {', '.join(missing)}; the objectives need a BERT-style vocabulary "
            "with [CLS], [SEP], [PAD] and [MASK] (or set tokenizer.path: null to train one)"
        )
    return tokenizer


def train_wordpiece(corpus: Dataset, vocab_size: int, lowercase: bool = True, min_frequency: int = 2):
    """Train a bert-base-uncased-style WordPiece tokenizer on ``corpus["text"]``; returns a fast BertTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    sample = _training_sample(corpus)
    # Determinism: the trainer numbers the "##c" continuation pieces in hash-map order and breaks ties between
    # equally frequent merges by those numbers, so the same corpus can give different vocabularies
    # (huggingface/tokenizers#1794). Declaring every "##c" up front, in sorted order, fixes their numbers.
    continuation = sorted(_continuation_chars(sample, backend))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *("##" + c for c in continuation)],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(_counted_batches(sample), trainer=trainer, length=len(sample))
    # a fresh pipeline whose only added (special) tokens are the five BERT ones; the vocabulary is renumbered
    # canonically (WordPiece's greedy longest match does not depend on ids)
    learned = sorted(set(backend.get_vocab(with_added_tokens=True)) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *learned])}
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
    )


# --------------------------------------------------------------------------- helpers


def _settings(tok_cfg) -> dict:
    return {
        "format": TOKENIZER_FORMAT_VERSION,
        "vocab_size": tok_cfg.vocab_size,
        "lowercase": tok_cfg.lowercase,
        "min_frequency": tok_cfg.min_frequency,
        "train_max_chars": TRAIN_MAX_CHARS,
    }


def _training_sample(corpus: Dataset) -> Dataset:
    """The corpus, or a seeded sample of its documents of about TRAIN_MAX_CHARS characters (kept in order)."""
    import pyarrow.compute as pc

    lengths = np.concatenate(
        [pc.utf8_length(batch["text"]).to_numpy(zero_copy_only=False)
         for batch in corpus.with_format("arrow").iter(batch_size=100_000)]
    )
    if lengths.sum() <= TRAIN_MAX_CHARS:
        return corpus
    order = np.random.default_rng(0).permutation(len(lengths))
    n = int(np.searchsorted(np.cumsum(lengths[order]), TRAIN_MAX_CHARS)) + 1
    logger.info("tokenizer: training on %d of %d documents (~%d characters)", n, len(lengths), TRAIN_MAX_CHARS)
    return corpus.select(np.sort(order[:n]))


def _continuation_chars(corpus: Dataset, backend) -> set[str]:
    """Characters that can follow another one inside a pre-tokenized word, i.e. that need a "##c" piece: every
    character of the normalised text except whitespace, punctuation and CJK ideographs, which BERT's pre-tokenizer
    always isolates (a few letters that only ever start words may get an unused "##c"; harmless)."""
    raw: set[str] = set()
    for texts in _text_batches(corpus):
        for text in texts:
            raw.update(text)
    # normalisation (lowercase, accent stripping) maps characters one by one, except context-dependent forms
    # such as a word-final sigma, which the second spelling catches
    normalize = backend.normalizer.normalize_str
    chars = {n for c in raw for n in normalize(c) + normalize("a" + c)[1:]}
    return {c for c in chars if not (c.isspace() or _is_punctuation(c) or _is_cjk(c))}


def _is_punctuation(c: str) -> bool:
    # as BERT's pre-tokenizer: any non-alphanumeric printable ASCII character, or a Unicode P* category
    if c.isascii():
        return c.isprintable() and not c.isalnum() and not c.isspace()
    return unicodedata.category(c).startswith("P")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


# the CJK Unified Ideographs blocks that BERT's normaliser surrounds with spaces (handle_chinese_chars)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _text_batches(corpus: Dataset) -> Iterator[list[str]]:
    for batch in corpus.iter(batch_size=TRAIN_BATCH_DOCS):
        yield batch["text"]


def _counted_batches(corpus: Dataset) -> Iterator[list[str]]:
    """``_text_batches`` with a progress display of the documents and characters the trainer has read (the word
    counting that reading drives is most of the training time; the merges that follow take a few seconds)."""
    with Progress("tokenizer: counting words", len(corpus), counted="char") as progress:
        for texts in _text_batches(corpus):
            yield texts
            progress.update(len(texts), sum(map(len, texts)))


def _save_atomically(tokenizer, out: Path, info: dict) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place (first writer wins)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save_pretrained(str(tmp))
        # a plain vocab.txt too, for tools that read WordPiece vocabularies directly
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (tmp / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "tokenizer.json").exists():
                raise  # not a concurrent writer that got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
