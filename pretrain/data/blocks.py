"""Packing of tokenized documents into fixed-length blocks, cached on disk.

Each split's documents form one token stream ``doc1 [SEP] doc2 [SEP] ...`` that is cut into blocks of
``data.block_size`` tokens ``[CLS] t_1 ... t_{L-2} [SEP]`` (no padding; the last partial block is dropped). Beside the
ids each block stores block-local word ids: 0, 1, 2, ... for real tokens (the pieces of one word share an id; a word
cut by the block start gets a new id) and -1 for [CLS]/[SEP]. Whole-word masking and SpanBERT read them.
The splits are drawn by document (seeded); a corpus of too few documents for that to give both splits a block (e.g.
one long document) is split by blocks instead: the last ``validation_fraction`` of its blocks are the validation split.

Tokenization runs in ``data.num_proc`` processes (``tokenize.py``) and streams batches in corpus order into one
sequential packer that appends blocks to the .npy files as they are cut, so the blocks, the split and the counts are
byte-identical for any ``num_proc``, and memory is bounded by the batches in flight, not by the corpus.

The blocks live in ``{cache_dir}/blocks/{key}/`` as .npy files (ids uint16 when the vocabulary fits, else uint32;
word ids int16), with ``meta.json`` and the train-split unigram counts; ``key`` hashes the corpus fingerprint, the
tokenizer, the block size, the validation fraction and the seed (not ``num_proc``). A later call with the same settings memory-maps
the files without reading the corpus or tokenizing. A split of more than ``npy.SHARD_TOKENS`` (2**31) tokens is
written as shards of whole blocks (``train_input_ids-00000.npy``, ...; see ``npy.py``) and read as one sequence; the
blocks do not depend on the shard size, so it is not part of the key either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from datasets import Dataset

from .corpus import corpus_fingerprint, expand_cache_dir, load_corpus
from .lock import build_lock
from .npy import ShardedAppender, ShardedRows, open_rows, truncate_rows
from .progress import Progress
from .tokenize import tokenize_documents
from .tokenizer import get_tokenizer, tokenizer_hash

logger = logging.getLogger(__name__)

#: bump when the block layout changes
BLOCKS_FORMAT_VERSION = 1
#: tokens copied at a time when the last blocks of a split by blocks move to the validation files
COPY_TOKENS = 1 << 24


class CorpusTooSmallError(ValueError):
    """The training split yields no complete block."""


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks: ``ds[i] -> {"input_ids": LongTensor[L], "word_ids": LongTensor[L]}``.

    Holds two ``[N, L]`` arrays (usually memory-mapped .npy files, or ``ShardedRows`` over their shards). Pickling
    (DataLoader workers started with spawn) sends the cache directory and split, not the data.
    """

    def __init__(self, input_ids: np.ndarray | ShardedRows, word_ids: np.ndarray | ShardedRows,
                 source: tuple[Path, str] | None = None):
        if input_ids.shape != word_ids.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {input_ids.shape} and word_ids {word_ids.shape} must both be [N, L]")
        self.input_ids, self.word_ids, self._source = input_ids, word_ids, source

    @classmethod
    def load(cls, directory: str | os.PathLike, split: str) -> "BlockDataset":
        """Memory-map ``{split}_input_ids`` and ``{split}_word_ids`` (one .npy file each, or their shards) of a block
        cache directory."""
        return cls(open_rows(directory, f"{split}_input_ids"), open_rows(directory, f"{split}_word_ids"),
                   (Path(directory), split))

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.size

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids[i].astype(np.int64)),
            "word_ids": torch.from_numpy(self.word_ids[i].astype(np.int64)),
        }

    def __getstate__(self):
        return self.__dict__ if self._source is None else {"_source": self._source}

    def __setstate__(self, state):
        if "input_ids" not in state:  # memory-mapped: reopen the files in this process
            state = BlockDataset.load(*state["_source"]).__dict__
        self.__dict__.update(state)


@dataclass
class PreparedData:
    tokenizer: object
    """The fast tokenizer the blocks were made with."""
    train: BlockDataset
    validation: BlockDataset
    unigram_counts: np.ndarray
    """[V] int64: occurrences of each token id in the train blocks (SpanBERT's random replacement)."""
    cache_path: Path
    """Directory holding the .npy files and meta.json."""
    meta: dict
    """meta.json: block/token/document counts per split, vocab size and the settings behind the cache key."""


def prepare_blocks(cfg) -> PreparedData:
    """Corpus -> tokenizer -> train/validation blocks, from the cache when the same settings were prepared before."""
    data_cfg = cfg.data
    corpus: Dataset | None = None

    def get_corpus() -> Dataset:
        nonlocal corpus
        if corpus is None:
            corpus = load_corpus(data_cfg)
        return corpus

    fingerprint = corpus_fingerprint(data_cfg)
    tokenizer = get_tokenizer(cfg.tokenizer, data_cfg, get_corpus)
    settings = {
        "format": BLOCKS_FORMAT_VERSION,
        "corpus_fingerprint": fingerprint,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "block_size": data_cfg.block_size,
        "validation_fraction": data_cfg.validation_fraction,
        "seed": cfg.train.seed,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = expand_cache_dir(data_cfg) / "blocks" / key
    with build_lock(out, "blocks"):  # once per cache, whichever processes or machines share it
        if not (out / "meta.json").exists():
            for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # of a killed builder (the lock is ours)
                shutil.rmtree(leftover, ignore_errors=True)
            _build(get_corpus(), tokenizer, settings, out, data_cfg.processes())
        else:
            logger.info("blocks: reusing %s", out)
    return _load(out, tokenizer)


def split_documents(n_docs: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded document split -> (train indices, validation indices), each sorted; at least one validation
    document when the fraction is > 0."""
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, round(validation_fraction * n_docs)) if validation_fraction > 0 else 0
    n_val = min(n_val, n_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pack_blocks(
    docs: Iterator[tuple[np.ndarray, np.ndarray]], block_size: int, cls_id: int, sep_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pack a stream of documents into blocks of ``block_size`` tokens.

    ``docs`` yields ``(flat_ids, flat_word_ids, lengths)`` per batch of documents: their token ids and
    document-local word ids concatenated, and the number of tokens of each document. Yields ``(ids [B, L],
    word_ids [B, L])`` for the complete blocks of each batch, carrying the remainder of the stream into the next
    batch; the final partial block is dropped.
    """
    inner = block_size - 2
    carry_ids = np.zeros(0, np.int64)
    carry_words = np.zeros(0, np.int64)
    for flat_ids, flat_words, lengths in docs:
        lengths = lengths[lengths > 0]
        if len(lengths) == 0:
            continue
        # insert one [SEP] (word id -1) after each document
        n = int(lengths.sum()) + len(lengths)
        sep_pos = np.cumsum(lengths + 1) - 1
        is_token = np.ones(n, bool)
        is_token[sep_pos] = False
        ids = np.empty(n, np.int64)
        words = np.empty(n, np.int64)
        ids[is_token], ids[sep_pos] = flat_ids, sep_id
        words[is_token], words[sep_pos] = flat_words, -1
        ids = np.concatenate([carry_ids, ids])
        words = np.concatenate([carry_words, words])
        n_blocks = len(ids) // inner
        cut = n_blocks * inner
        carry_ids, carry_words = ids[cut:], words[cut:]
        if n_blocks:
            yield _frame(ids[:cut].reshape(n_blocks, inner), words[:cut].reshape(n_blocks, inner), cls_id, sep_id)


def _frame(ids: np.ndarray, doc_words: np.ndarray, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L-2] stream slices -> [CLS] ... [SEP] blocks with block-local word ids."""
    real = doc_words >= 0
    # a real token starts a word at the block start, after a [SEP], or when its document word id changes
    starts = real.copy()
    starts[:, 1:] &= doc_words[:, 1:] != doc_words[:, :-1]
    local = np.where(real, np.cumsum(starts, axis=1) - 1, -1)
    b = ids.shape[0]
    full_ids = np.concatenate([np.full((b, 1), cls_id), ids, np.full((b, 1), sep_id)], axis=1)
    full_words = np.concatenate([np.full((b, 1), -1), local, np.full((b, 1), -1)], axis=1)
    return full_ids, full_words


# --------------------------------------------------------------------------- build / load


@dataclass
class _Split:
    """What a split's files hold: ``blocks`` blocks cut from ``documents`` documents whose stream (tokens plus one
    [SEP] per non-empty document) has ``stream_tokens`` tokens."""

    documents: int
    stream_tokens: int
    blocks: int


@dataclass
class _Packer:
    """Tokenizes and packs documents into a split's two .npy files, counting its tokens into ``unigram``."""

    tokenizer: object
    block_size: int
    ids_dtype: type
    num_proc: int
    tmp: Path

    def __call__(self, docs: Dataset, name: str, progress: Progress, unigram: np.ndarray | None = None) -> _Split:
        stream = 0

        def batches():
            nonlocal stream
            for ids, words, lengths in tokenize_documents(docs, self.tokenizer, self.num_proc):
                stream += int(lengths.sum()) + int((lengths > 0).sum())
                progress.update(len(lengths), len(ids))
                yield ids, words, lengths

        tok = self.tokenizer
        with ShardedAppender(self.tmp, f"{name}_input_ids", self.ids_dtype, self.block_size) as ids_out, \
                ShardedAppender(self.tmp, f"{name}_word_ids", np.int16, self.block_size) as words_out:
            for ids, words in pack_blocks(batches(), self.block_size, tok.cls_token_id, tok.sep_token_id):
                ids_out.append(ids)
                words_out.append(words)
                if unigram is not None:
                    unigram += np.bincount(ids.ravel(), minlength=len(unigram))[:len(unigram)]
        return _Split(len(docs), stream, ids_out.rows)


def _split_by_documents(corpus: Dataset, settings: dict, pack: _Packer, unigram: np.ndarray) -> dict | None:
    """The seeded split by document: each split is the whole stream of its own documents. None when the
    validation fraction is > 0 but a split gets no block (the validation split is packed first: it is small)."""
    train_idx, val_idx = split_documents(len(corpus), settings["validation_fraction"], settings["seed"])
    splits = {}
    with Progress("tokenizing+packing", len(corpus)) as progress:
        for name, idx in (("validation", val_idx), ("train", train_idx)):
            splits[name] = pack(corpus.select(idx), name, progress, unigram if name == "train" else None)
            if settings["validation_fraction"] > 0 and splits[name].blocks == 0:
                logger.warning("%d documents: the %s split by document (%d documents) gives no block of %d tokens; "
                               "splitting the token stream by blocks instead", len(corpus), name,
                               splits[name].documents, settings["block_size"])
                return None
    return {"train": splits["train"], "validation": splits["validation"]}


def _split_by_blocks(corpus: Dataset, settings: dict, pack: _Packer, unigram: np.ndarray) -> dict:
    """The split by blocks, for corpora of too few documents to split by document: the last
    ``validation_fraction`` of the blocks of the whole stream (at least one) is the validation split."""
    unigram[:] = 0
    with Progress("tokenizing+packing (split by blocks)", len(corpus)) as progress:
        whole = pack(corpus, "train", progress, unigram)
    n_val = min(max(1, round(settings["validation_fraction"] * whole.blocks)), whole.blocks)
    keep = whole.blocks - n_val
    step = max(1, COPY_TOKENS // settings["block_size"])

    def copy_tail(column: str) -> None:  # its memory maps close on return, before the files are truncated
        rows = open_rows(pack.tmp, f"train_{column}")
        with ShardedAppender(pack.tmp, f"validation_{column}", rows.dtype, settings["block_size"]) as out:
            for lo in range(keep, whole.blocks, step):
                tail = np.asarray(rows[lo:lo + step])
                out.append(tail)
                if column == "input_ids":
                    unigram[:] -= np.bincount(tail.ravel(), minlength=len(unigram))[:len(unigram)]

    for column in ("input_ids", "word_ids"):
        copy_tail(column)
        truncate_rows(pack.tmp, f"train_{column}", keep)
    return {"train": _Split(len(corpus), whole.stream_tokens, keep),
            "validation": _Split(len(corpus), whole.stream_tokens, n_val)}


def _build(corpus: Dataset, tokenizer, settings: dict, out: Path, num_proc: int) -> None:
    start = time.perf_counter()
    block_size = settings["block_size"]
    vocab_size = len(tokenizer)
    ids_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pack = _Packer(tokenizer, block_size, ids_dtype, num_proc, tmp)
        unigram = np.zeros(vocab_size, np.int64)
        splits, split_by = _split_by_documents(corpus, settings, pack, unigram), "documents"
        if splits is None:
            splits, split_by = _split_by_blocks(corpus, settings, pack, unigram), "blocks"
        train = splits["train"]
        if train.blocks == 0:
            need = "two blocks (one to train on, one to validate)" if split_by == "blocks" else "one block"
            raise CorpusTooSmallError(
                f"corpus too small for block_size {block_size}: got {train.stream_tokens} tokens in the training "
                f"split ({train.documents} documents) but a block holds {block_size - 2} and training needs {need}; "
                "add text or lower data.block_size"
            )
        meta = {**settings, "vocab_size": vocab_size, "ids_dtype": np.dtype(ids_dtype).name, "split_by": split_by,
                "splits": {name: {"documents": split.documents, "stream_tokens": split.stream_tokens,
                                  "blocks": split.blocks, "tokens": split.blocks * block_size}
                           for name, split in splits.items()}}
        np.save(tmp / "unigram_counts.npy", unigram)
        meta["seconds"] = round(time.perf_counter() - start, 2)
        meta["num_proc"] = num_proc  # how it was built (not part of the key: any value gives the same blocks)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():
                raise  # not a concurrent writer that finished first
        logger.info(
            "blocks: %d train / %d validation blocks of %d tokens (split by %s) in %.1fs on %d processes -> %s",
            meta["splits"]["train"]["blocks"], meta["splits"]["validation"]["blocks"], block_size, split_by,
            meta["seconds"], num_proc, out,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(out: Path, tokenizer) -> PreparedData:
    meta = json.loads((out / "meta.json").read_text())
    return PreparedData(
        tokenizer=tokenizer,
        train=BlockDataset.load(out, "train"),
        validation=BlockDataset.load(out, "validation"),
        unigram_counts=np.load(out / "unigram_counts.npy"),
        cache_path=out,
        meta=meta,
    )
