"""Data pipeline: corpus loading, tokenizer training, tokenization + packing into cached blocks, demo corpus.

``prepare_blocks(cfg)`` is the entry point used by the trainer; the rest is exposed for scripts and tests.
"""

from .blocks import BlockDataset, CorpusTooSmallError, PreparedData, prepare_blocks
from .corpus import CorpusError, corpus_fingerprint, load_corpus
from .demo import fetch_demo_corpus, wordnet_supersense
from .tokenizer import get_tokenizer

__all__ = [
    "BlockDataset",
    "CorpusError",
    "CorpusTooSmallError",
    "PreparedData",
    "corpus_fingerprint",
    "fetch_demo_corpus",
    "get_tokenizer",
    "load_corpus",
    "prepare_blocks",
    "wordnet_supersense",
]
