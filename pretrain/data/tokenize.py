"""Tokenization with word ids, in ``num_proc`` processes, streamed in corpus order.

``tokenize_documents(docs, tokenizer, num_proc)`` yields one ``(ids, word_ids, lengths)`` batch per
``TOKENIZE_BATCH_DOCS`` documents, always in the order of ``docs``: the pool's results are consumed in submission
order, so the stream (and everything packed from it) is byte-identical for any ``num_proc``. At most
``2 * num_proc`` batches are in flight, so memory is bounded by the batch size, not by the corpus.

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
import itertools
import multiprocessing
import os
from collections import deque
from typing import Iterator

import numpy as np
from datasets import Dataset

#: documents per tokenizer call (and per task of a worker)
TOKENIZE_BATCH_DOCS = 1000

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
    """``encode`` of ``docs["text"]`` per batch of ``TOKENIZE_BATCH_DOCS`` documents, in order, on ``num_proc``
    processes (1: in this process)."""
    ranges = [(lo, min(lo + TOKENIZE_BATCH_DOCS, len(docs))) for lo in range(0, len(docs), TOKENIZE_BATCH_DOCS)]
    with _one_tokenizer_thread():
        if num_proc == 1 or len(ranges) <= 1:
            for lo, hi in ranges:
                yield encode(tokenizer, docs[lo:hi]["text"])
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(min(num_proc, len(ranges)), _init_worker, (docs, tokenizer)) as pool:
            todo, pending = iter(ranges), deque()
            for bounds in todo:
                pending.append(pool.apply_async(_encode_rows, (bounds,)))
                if len(pending) == 2 * num_proc:
                    break
            while pending:
                result = pending.popleft().get()
                bounds = next(todo, None)
                if bounds is not None:
                    pending.append(pool.apply_async(_encode_rows, (bounds,)))
                yield result


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
