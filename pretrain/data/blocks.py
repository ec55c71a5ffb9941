"""Tokenization with word ids and packing into fixed-length blocks, cached on disk.

Each split's documents form one token stream ``doc1 [SEP] doc2 [SEP] ...`` that is cut into blocks of
``data.block_size`` tokens ``[CLS] t_1 ... t_{L-2} [SEP]`` (no padding; the last partial block is dropped). Beside the
ids each block stores block-local word ids: 0, 1, 2, ... for real tokens (the pieces of one word share an id; a word
cut by the block start gets a new id) and -1 for [CLS]/[SEP]. Whole-word masking and SpanBERT read them.
The splits are drawn by document (seeded); a corpus of too few documents for that to give both splits a block (e.g.
one long document) is split by blocks instead: the last ``validation_fraction`` of its blocks are the validation split.

The blocks live in ``{cache_dir}/blocks/{key}/`` as .npy files (ids uint16 when the vocabulary fits, else uint32;
word ids int16), with ``meta.json`` and the train-split unigram counts; ``key`` hashes the corpus fingerprint, the
tokenizer, the block size, the validation fraction and the seed. A later call with the same settings memory-maps
the files without reading the corpus or tokenizing.
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
from datasets import Dataset, Features, List, Value

from .corpus import corpus_fingerprint, expand_cache_dir, load_corpus
from .tokenizer import get_tokenizer, tokenizer_hash

logger = logging.getLogger(__name__)

#: bump when the block layout changes
BLOCKS_FORMAT_VERSION = 1
SPLITS = ("train", "validation")
#: documents per tokenizer call inside datasets.map
TOKENIZE_BATCH_DOCS = 1000


class CorpusTooSmallError(ValueError):
    """The training split yields no complete block."""


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks: ``ds[i] -> {"input_ids": LongTensor[L], "word_ids": LongTensor[L]}``.

    Holds two ``[N, L]`` arrays (usually memory-mapped .npy files). Pickling (DataLoader workers started with
    spawn) sends the file paths, not the data.
    """

    def __init__(self, input_ids: np.ndarray, word_ids: np.ndarray, paths: tuple[Path, Path] | None = None):
        if input_ids.shape != word_ids.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {input_ids.shape} and word_ids {word_ids.shape} must both be [N, L]")
        self.input_ids, self.word_ids, self._paths = input_ids, word_ids, paths

    @classmethod
    def load(cls, directory: str | os.PathLike, split: str) -> "BlockDataset":
        """Memory-map ``{split}_input_ids.npy`` and ``{split}_word_ids.npy`` of a block cache directory."""
        paths = (Path(directory) / f"{split}_input_ids.npy", Path(directory) / f"{split}_word_ids.npy")
        return cls(np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r"), paths)

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
        return self.__dict__ if self._paths is None else {"_paths": self._paths}

    def __setstate__(self, state):
        if "input_ids" not in state:  # memory-mapped: reopen the files in this process
            paths = state["_paths"]
            state = {"input_ids": np.load(paths[0], mmap_mode="r"), "word_ids": np.load(paths[1], mmap_mode="r"),
                     "_paths": paths}
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
    if not (out / "meta.json").exists():
        _build(get_corpus(), tokenizer, settings, out)
    else:
        logger.info("blocks: reusing %s", out)
    return _load(out, tokenizer)


def tokenize_documents(docs: Dataset, tokenizer, cache_file: Path) -> Dataset:
    """``text`` -> ``input_ids`` and document-local ``word_ids`` (int32 lists; no special tokens added)."""

    def encode(batch: dict) -> dict:
        enc = tokenizer(
            batch["text"],
            add_special_tokens=False,
            truncation=False,
            split_special_tokens=True,  # a literal "[SEP]" or "[MASK]" in the text is text, not a special token
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        words = [[-1 if w is None else w for w in e.word_ids] for e in enc.encodings]
        return {"input_ids": enc["input_ids"], "word_ids": words}

    return docs.map(
        encode,
        batched=True,
        batch_size=TOKENIZE_BATCH_DOCS,
        num_proc=1,
        remove_columns=docs.column_names,
        features=Features({"input_ids": List(Value("int32")), "word_ids": List(Value("int32"))}),
        cache_file_name=str(cache_file),
        load_from_cache_file=False,
        new_fingerprint=cache_file.stem + uuid.uuid4().hex[:8],
        desc="tokenizing",
    )


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


def _token_batches(tokenized: Dataset) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(flat ids, flat word ids, tokens per document) per Arrow batch of a tokenized split."""
    import pyarrow.compute as pc

    for batch in tokenized.with_format("arrow").iter(batch_size=10_000):
        ids_col, words_col = batch["input_ids"].combine_chunks(), batch["word_ids"].combine_chunks()
        lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        yield (
            ids_col.flatten().to_numpy(zero_copy_only=False),
            words_col.flatten().to_numpy(zero_copy_only=False),
            lengths,
        )


def _count_tokens(tokenized: Dataset) -> tuple[int, int]:
    """(stream length incl. one [SEP] per non-empty document, non-empty documents)."""
    total, n_docs = 0, 0
    for _, _, lengths in _token_batches(tokenized):
        nonzero = lengths[lengths > 0]
        total += int(nonzero.sum()) + len(nonzero)
        n_docs += len(nonzero)
    return total, n_docs


@dataclass
class _Split:
    """Where a split's blocks come from: rows ``[first, first + blocks)`` of the packed stream of ``tokenized``."""

    tokenized: Dataset | None
    first: int
    blocks: int
    documents: int
    stream_tokens: int


def _document_splits(corpus: Dataset, tokenizer, settings: dict, tmp: Path) -> dict[str, _Split]:
    """The seeded split by document: each split is the whole stream of its own documents."""
    inner = settings["block_size"] - 2
    splits = {}
    for split, idx in zip(SPLITS, split_documents(len(corpus), settings["validation_fraction"], settings["seed"])):
        tokenized = tokenize_documents(corpus.select(idx), tokenizer, tmp / f"tokens-{split}.arrow") if len(idx) else None
        stream = _count_tokens(tokenized)[0] if tokenized is not None else 0
        splits[split] = _Split(tokenized, 0, stream // inner, len(idx), stream)
    return splits


def _block_splits(corpus: Dataset, tokenizer, settings: dict, tmp: Path) -> dict[str, _Split]:
    """The split by blocks, for corpora of too few documents to split by document: the last
    ``validation_fraction`` of the blocks of the whole stream (at least one) is the validation split."""
    tokenized = tokenize_documents(corpus, tokenizer, tmp / "tokens-all.arrow")
    stream = _count_tokens(tokenized)[0]
    total = stream // (settings["block_size"] - 2)
    n_val = min(max(1, round(settings["validation_fraction"] * total)), total)
    return {"train": _Split(tokenized, 0, total - n_val, len(corpus), stream),
            "validation": _Split(tokenized, total - n_val, n_val, len(corpus), stream)}


def _plan_splits(corpus: Dataset, tokenizer, settings: dict, tmp: Path) -> tuple[dict[str, _Split], str]:
    """Split by document, or by blocks when that leaves a split without a block; ``(splits, "documents" or
    "blocks")``. Raises :class:`CorpusTooSmallError` when the training split still has no block."""
    splits, split_by = _document_splits(corpus, tokenizer, settings, tmp), "documents"
    if settings["validation_fraction"] > 0 and not all(s.blocks for s in splits.values()):
        logger.warning("%d documents give the train/validation split by document %d/%d blocks: splitting the "
                       "token stream by blocks instead", len(corpus), splits["train"].blocks,
                       splits["validation"].blocks)
        splits, split_by = _block_splits(corpus, tokenizer, settings, tmp), "blocks"
    train, block_size = splits["train"], settings["block_size"]
    if train.blocks == 0:
        need = "two blocks (one to train on, one to validate)" if split_by == "blocks" else "one block"
        raise CorpusTooSmallError(
            f"corpus too small for block_size {block_size}: got {train.stream_tokens} tokens in the training split "
            f"({train.documents} documents) but a block holds {block_size - 2} and training needs {need}; add text "
            "or lower data.block_size"
        )
    return splits, split_by


def _write_split(split: _Split, block_size: int, tokenizer, ids_dtype, tmp: Path, name: str,
                 unigram: np.ndarray | None) -> None:
    """Pack ``split`` into ``{name}_input_ids.npy`` / ``{name}_word_ids.npy``; count its tokens into ``unigram``."""
    ids_out = np.lib.format.open_memmap(tmp / f"{name}_input_ids.npy", "w+", ids_dtype, (split.blocks, block_size))
    words_out = np.lib.format.open_memmap(tmp / f"{name}_word_ids.npy", "w+", np.int16, (split.blocks, block_size))
    row, stop = 0, split.first + split.blocks  # rows of the packed stream
    if split.blocks:
        for ids, words in pack_blocks(_token_batches(split.tokenized), block_size, tokenizer.cls_token_id,
                                      tokenizer.sep_token_id):
            lo, hi = max(split.first, row), min(stop, row + len(ids))
            if lo < hi:
                ids_out[lo - split.first : hi - split.first] = ids[lo - row : hi - row]
                words_out[lo - split.first : hi - split.first] = words[lo - row : hi - row]
                if unigram is not None:
                    unigram += np.bincount(ids[lo - row : hi - row].ravel(), minlength=len(unigram))[:len(unigram)]
            row += len(ids)
            if row >= stop:
                break
        assert row >= stop, (row, stop)
    ids_out.flush()
    words_out.flush()


def _build(corpus: Dataset, tokenizer, settings: dict, out: Path) -> None:
    start = time.perf_counter()
    block_size = settings["block_size"]
    vocab_size = len(tokenizer)
    ids_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        splits, split_by = _plan_splits(corpus, tokenizer, settings, tmp)
        meta = {**settings, "vocab_size": vocab_size, "ids_dtype": np.dtype(ids_dtype).name, "split_by": split_by,
                "splits": {}}
        unigram = np.zeros(vocab_size, np.int64)
        for name, split in splits.items():
            _write_split(split, block_size, tokenizer, ids_dtype, tmp, name, unigram if name == "train" else None)
            meta["splits"][name] = {
                "documents": int(split.documents),
                "stream_tokens": int(split.stream_tokens),
                "blocks": int(split.blocks),
                "tokens": int(split.blocks * block_size),
            }
        del splits  # the memory-mapped Arrow files, before they are removed
        np.save(tmp / "unigram_counts.npy", unigram)
        for f in tmp.glob("tokens-*"):
            f.unlink()  # the intermediate Arrow files of datasets.map
        for f in tmp.glob("cache-*"):
            f.unlink()
        meta["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():
                raise  # not a concurrent writer that finished first
        logger.info(
            "blocks: %d train / %d validation blocks of %d tokens (split by %s) in %.1fs -> %s",
            meta["splits"]["train"]["blocks"], meta["splits"]["validation"]["blocks"], block_size, split_by,
            meta["seconds"], out,
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
