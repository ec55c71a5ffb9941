"""Tokenization with word ids, in ``num_proc`` processes, streamed in corpus order.

``tokenize_documents(docs, tokenizer, num_proc)`` yields one ``(ids, word_ids, lengths)`` batch per run of
consecutive documents of at most ``TOKENIZE_BATCH_BYTES`` of UTF-8 text and ``TOKENIZE_BATCH_DOCS`` documents (a
longer document is a batch of its own), always in the order of ``docs``: the pool's results are consumed in
submission order, so the stream (and everything packed from it) is byte-identical for any ``num_proc``. At most
``2 * num_proc`` batches are in flight, so memory is bounded by the batch's bytes, not by the corpus or by how long
its documents are (a count of documents alone let 1000 book-length documents into one batch).

Forking and the Rust tokenizer: the ``tokenizers`` thread pool does not survive ``fork`` (a child that uses it can
deadlock; the library then prints "The current process just got forked, after parallelism has already been used"
and switches it off). Tokenization runs with ``TOKENIZERS_PARALLELISM=false`` (restored afterwards), set before the
workers are forked: every process tokenizes on one thread, so ``num_proc`` processes use ``num_proc`` cores, the
children never touch the parent's thread pool and the library has nothing to warn about. The workers inherit the
corpus (memory-mapped Arrow) and the tokenizer through ``fork`` and read their documents themselves; only row ranges
go to them and numpy arrays come back. Where ``fork`` does not exist (macOS/Windows default), ``spawn`` pickles both.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing
import os
from collections import deque
from typing import Iterator

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

#: at most this many documents per tokenizer call (and per task of a worker) ...
TOKENIZE_BATCH_DOCS = 1000
#: ... and at most this much UTF-8 text (about 250k tokens of English: ~40 MB of the tokenizer's encodings)
TOKENIZE_BATCH_BYTES = 1 << 20
#: rows whose text lengths are read at once (a dataset with an indices mapping copies their text to measure it)
LENGTH_WINDOW_DOCS = 64

#: (documents, tokenizer) of a worker process, set by its initializer
_worker: tuple[Dataset, object] | None = None


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``texts`` -> (ids int32 [T], document-local word ids int32 [T] (-1 where None), tokens per text int64 [D]);
    no special tokens are added and a literal "[SEP]" in the text is text."""
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=False,
        split_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    lengths = np.fromiter(map(len, enc["input_ids"]), np.int64, len(texts))
    ids = np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), np.int32, int(lengths.sum()))
    words = np.fromiter((-1 if w is None else w for e in enc.encodings for w in e.word_ids), np.int32, len(ids))
    return ids, words, lengths


def tokenize_documents(docs: Dataset, tokenizer, num_proc: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]]:
    """``encode`` of ``docs["text"]`` per batch of :func:`document_ranges`, in order, on ``num_proc`` processes (1:
    in this process)."""
    ranges = document_ranges(docs)
    first = list(itertools.islice(ranges, max(2, num_proc)))  # no more workers than batches
    ranges = itertools.chain(first, ranges)
    with _one_tokenizer_thread():
        if num_proc == 1 or len(first) <= 1:
            for lo, hi in ranges:
                yield encode(tokenizer, docs[lo:hi]["text"])
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with _frozen_heap(), context.Pool(min(num_proc, len(first)), _init_worker, (docs, tokenizer)) as pool:
            pending = deque()
            for bounds in ranges:
                pending.append(pool.apply_async(_encode_rows, (bounds,)))
                if len(pending) == 2 * num_proc:
                    break
            while pending:
                result = pending.popleft().get()
                bounds = next(ranges, None)
                if bounds is not None:
                    pending.append(pool.apply_async(_encode_rows, (bounds,)))
                yield result


def document_ranges(docs: Dataset, max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[
        tuple[int, int]]:
    """Consecutive ``(lo, hi)`` row ranges covering ``docs`` in order, each of at most ``max_docs`` documents
    (default ``TOKENIZE_BATCH_DOCS``) and ``max_bytes`` of UTF-8 text (default ``TOKENIZE_BATCH_BYTES``), or one
    document that alone is longer. The lengths are read ``LENGTH_WINDOW_DOCS`` rows at a time, lazily, so the
    parent never holds more than that many documents' text (a selection of rows copies the text it measures)."""
    max_docs = max_docs or TOKENIZE_BATCH_DOCS
    max_bytes = max_bytes or TOKENIZE_BATCH_BYTES
    rows = docs.with_format("arrow")
    start, size = 0, 0
    for window in range(0, len(docs), LENGTH_WINDOW_DOCS):
        lengths = pc.fill_null(pc.binary_length(rows[window:window + LENGTH_WINDOW_DOCS]["text"]), 0).to_numpy()
        for i, n_bytes in enumerate(lengths.tolist(), window):
            if i > start and (size + n_bytes > max_bytes or i - start == max_docs):
                yield start, i
                start, size = i, 0
            size += n_bytes
    if len(docs) > start:
        yield start, len(docs)


@contextlib.contextmanager
def _frozen_heap():
    """``gc.freeze()`` while the workers live: the objects the parent holds at the fork move to the collector's
    permanent generation, so no collection in a worker writes to their pages and the copy-on-write pages stay shared
    (without it the workers' private memory grew with the time they ran: 2 processes on 128 MiB peaked at 660 MB of
    the process tree's Pss_Anon, with it at 469 MB)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _one_tokenizer_thread():
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _init_worker(docs: Dataset, tokenizer) -> None:
    global _worker
    _worker = docs, tokenizer


def _encode_rows(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    docs, tokenizer = _worker
    return encode(tokenizer, docs[bounds[0]:bounds[1]]["text"])
