"""Data pipeline: corpus loading and its errors, WordPiece training, packing invariants, the block cache, the demo
corpus. Tiny corpora are written to tmp_path; only ``test_demo_bible`` uses the network (a Debian mirror)."""

from __future__ import annotations

import json
import re
import shutil
import pickle
import random
import time

import numpy as np
import pytest
import torch

from pretrain.config import Config, DataConfig, TokenizerConfig, TrainConfig
from pretrain.data import blocks as blocks_mod
from pretrain.data import demo as demo_mod
from pretrain.data import tokenizer as tokenizer_mod
from pretrain.data import BlockDataset, CorpusTooSmallError, corpus_fingerprint, get_tokenizer, load_corpus
from pretrain.data import prepare_blocks
from pretrain.data.blocks import pack_blocks, split_documents
from pretrain.data.corpus import DatasetUnavailableError, EmptyCorpusError, MissingTextColumnError
from pretrain.data.corpus import UnsupportedFileError

WORDS = ("river mountain valley forest ocean island desert village castle bridge garden market harbor meadow "
         "walk run read write build paint carry follow discover wander remember quiet bright ancient gentle "
         "stormy golden hidden narrow the a of and in on with under over beyond").split()
SUFFIXES = ["", "", "", "s", "ing", "ed", "ly", "ness"]


def toy_docs(n: int, seed: int = 0, words: tuple[int, int] = (15, 60)) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentence = [rng.choice(WORDS) + rng.choice(SUFFIXES) for _ in range(rng.randint(*words))]
        docs.append(" ".join(sentence).capitalize() + ".")
    return docs


def write_jsonl(path, docs, column="text", **extra):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({column: d, "id": i, **extra}) + "\n")
    return path


def data_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def make_cfg(tmp_path, files, block_size=32, validation_fraction=0.1, seed=0, vocab_size=200, **data_kw) -> Config:
    return Config(
        data=DataConfig(files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), block_size=block_size,
                        validation_fraction=validation_fraction, **data_kw),
        tokenizer=TokenizerConfig(vocab_size=vocab_size, min_frequency=1),
        train=TrainConfig(seed=seed),
    )


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", toy_docs(120))


# --------------------------------------------------------------------------- corpus loading


def test_txt_one_document_per_line_and_empty_lines_dropped(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\n   \nsecond document\n")
    corpus = load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "a.txt")]))
    assert corpus.column_names == ["text"]
    assert corpus["text"] == ["first document", "second document"]


def test_mixed_formats_and_globs(tmp_path):
    import pandas as pd

    write_jsonl(tmp_path / "a.jsonl", ["json one", "json two"])
    write_jsonl(tmp_path / "b.jsonl", ["json three"])
    pd.DataFrame({"text": ["csv one", "csv two"], "n": [1, 2]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"text": ["parquet one"], "n": [3]}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("text one\ntext two\n")
    files = [str(tmp_path / "*.jsonl"), str(tmp_path / "c.csv"), str(tmp_path / "d.parquet"), str(tmp_path / "e.txt")]
    corpus = load_corpus(data_cfg(tmp_path, files=files))
    assert corpus.column_names == ["text"]
    assert corpus["text"] == ["json one", "json two", "json three", "csv one", "csv two", "parquet one",
                              "text one", "text two"]


def test_text_column_is_renamed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["alpha beta", "gamma"], column="body")
    corpus = load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "a.jsonl")], text_column="body"))
    assert corpus.column_names == ["text"] and corpus["text"] == ["alpha beta", "gamma"]


def test_missing_text_column_lists_the_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["alpha"], column="body")
    with pytest.raises(MissingTextColumnError, match=r"no column 'text'.*body, id.*data.text_column"):
        load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "a.jsonl")]))


def test_empty_corpus_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["", "   ", "\n\t"])
    with pytest.raises(EmptyCorpusError, match="corpus is empty: 3 documents"):
        load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "a.jsonl")]))


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches .*nope.txt"):
        load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "nope.txt")]))
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*.jsonl"):
        load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "none" / "*.jsonl")]))


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(UnsupportedFileError, match=r"extension '.docx'.*supported: .csv"):
        load_corpus(data_cfg(tmp_path, files=[str(tmp_path / "a.docx")]))


def test_max_documents_keeps_the_first(tmp_path, corpus_file):
    corpus = load_corpus(data_cfg(tmp_path, files=[str(corpus_file)], max_documents=7))
    assert corpus["text"] == toy_docs(120)[:7]


def test_offline_hub_dataset_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    import huggingface_hub.constants

    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="not in the local datasets cache.*offline"):
        load_corpus(data_cfg(tmp_path, dataset="someone/not-a-cached-dataset"))
    assert time.perf_counter() - start < 10, "offline mode must fail at once, not retry the network"
    # the libraries read the variables at import time; the loader switches them for the call only
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_corpus_fingerprint_tracks_files_and_settings(tmp_path, corpus_file):
    cfg = data_cfg(tmp_path, files=[str(corpus_file)])
    first = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == first
    assert corpus_fingerprint(data_cfg(tmp_path, files=[str(corpus_file)], max_documents=5)) != first
    with open(corpus_file, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert corpus_fingerprint(cfg) != first


# --------------------------------------------------------------------------- tokenizer


def test_wordpiece_training_round_trip_and_cache(tmp_path, corpus_file, monkeypatch):
    from transformers import AutoTokenizer

    dcfg, tcfg = data_cfg(tmp_path, files=[str(corpus_file)]), TokenizerConfig(vocab_size=200, min_frequency=1)
    tok = get_tokenizer(tcfg, dcfg)
    assert tok.is_fast and len(tok) == 200
    specials = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert specials == [0, 1, 2, 3, 4]
    cache_dirs = [p for p in (tmp_path / "cache" / "tokenizers").iterdir() if p.is_dir()]  # beside: its .lock
    assert len(cache_dirs) == 1 and (cache_dirs[0] / "tokenizer.json").exists()

    reloaded = AutoTokenizer.from_pretrained(cache_dirs[0])
    text = "The hidden rivers wandering beyond golden mountains."
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    ids = reloaded(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    for word in ("mountains", "wandering", "tide"):  # seen word, seen stem + suffix, unseen word of seen letters
        pieces = reloaded.tokenize(word)
        assert pieces and "[UNK]" not in pieces, (word, pieces)
        assert all(p.startswith("##") for p in pieces[1:]) and not pieces[0].startswith("##")
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text.lower()

    # the second call loads the cached tokenizer instead of training
    monkeypatch.setattr(tokenizer_mod, "train_wordpiece", lambda *a, **k: pytest.fail("retrained"))
    assert get_tokenizer(tcfg, dcfg).get_vocab() == tok.get_vocab()


def test_wordpiece_training_is_deterministic(tmp_path, corpus_file):
    corpus = load_corpus(data_cfg(tmp_path, files=[str(corpus_file)]))
    a = tokenizer_mod.train_wordpiece(corpus, 300, min_frequency=1)
    b = tokenizer_mod.train_wordpiece(corpus, 300, min_frequency=1)
    assert a.get_vocab() == b.get_vocab()


def test_tokenizer_path_is_loaded_and_checked(tmp_path, corpus_file):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dcfg = data_cfg(tmp_path, files=[str(corpus_file)])
    trained = get_tokenizer(TokenizerConfig(vocab_size=150, min_frequency=1), dcfg)
    trained.save_pretrained(tmp_path / "tok")
    loaded = get_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")), dcfg)
    assert loaded.get_vocab() == trained.get_vocab()

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "a": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]").save_pretrained(tmp_path / "nomask")
    with pytest.raises(ValueError, match=r"no mask_token \(\[MASK\]\)"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "nomask")), dcfg)


# --------------------------------------------------------------------------- packing


def test_pack_blocks_hand_built():
    # documents: word ids per token; doc A = w0 w1 w1 w2 (4 tokens), doc B = w0 w0 w1 (3 tokens); SEP = 3, CLS = 2
    ids = np.array([10, 11, 12, 13, 20, 21, 22])
    words = np.array([0, 1, 1, 2, 0, 0, 1])
    lengths = np.array([4, 3])
    # stream: 10 11 12 13 S 20 21 22 S  -> inner size 3: [10 11 12] [13 S 20] [21 22 S]
    out = list(pack_blocks(iter([(ids, words, lengths)]), block_size=5, cls_id=2, sep_id=3))
    assert len(out) == 1
    block_ids, block_words = out[0]
    assert block_ids.tolist() == [[2, 10, 11, 12, 3], [2, 13, 3, 20, 3], [2, 21, 22, 3, 3]]
    # block 2 starts inside doc B's first word (20 21): its piece 21 gets its own id 0, piece 22 is the next word
    assert block_words.tolist() == [[-1, 0, 1, 1, -1], [-1, 0, -1, 1, -1], [-1, 0, 1, -1, -1]]


def test_pack_blocks_carries_across_batches_and_cut_words():
    # doc 1 is one word of 3 pieces, cut by a block boundary; doc 2 arrives in the next input batch
    batches = [(np.array([1, 2, 3]), np.array([0, 0, 0]), np.array([3])),
               (np.array([4, 5, 6, 7]), np.array([0, 0, 1, 1]), np.array([4]))]
    out = list(pack_blocks(iter(batches), block_size=4, cls_id=90, sep_id=91))
    ids = np.concatenate([b[0] for b in out])
    words = np.concatenate([b[1] for b in out])
    # stream 1 2 3 S 4 5 6 7 S -> [1 2] [3 S] [4 5] [6 7]
    assert ids[:, 1:-1].tolist() == [[1, 2], [3, 91], [4, 5], [6, 7]]
    assert words.tolist() == [[-1, 0, 0, -1], [-1, 0, -1, -1], [-1, 0, 0, -1], [-1, 0, 0, -1]]


def test_split_documents_disjoint_and_seeded():
    train, val = split_documents(1000, 0.05, seed=3)
    assert len(val) == 50 and len(train) == 950
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert np.array_equal(split_documents(1000, 0.05, seed=3)[1], val)
    assert not np.array_equal(split_documents(1000, 0.05, seed=4)[1], val)
    assert len(split_documents(10, 0.001, seed=0)[1]) == 1  # at least one validation document
    assert len(split_documents(10, 0.0, seed=0)[1]) == 0


@pytest.fixture
def prepared(tmp_path, corpus_file):
    cfg = make_cfg(tmp_path, [corpus_file])
    return cfg, prepare_blocks(cfg)


def _stream(texts, tokenizer):
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out += ids + [tokenizer.sep_token_id]
    return np.array(out)


def test_packing_invariants(prepared):
    cfg, data = prepared
    tok, L = data.tokenizer, cfg.data.block_size
    corpus = load_corpus(cfg.data)
    train_idx, val_idx = split_documents(len(corpus), cfg.data.validation_fraction, cfg.train.seed)
    for split, idx in (("train", train_idx), ("validation", val_idx)):
        ds = getattr(data, split)
        assert ds.block_size == L and len(ds) > 0
        ids, words = np.asarray(ds.input_ids), np.asarray(ds.word_ids)
        assert ids.shape == words.shape == (len(ds), L)
        assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
        assert not (ids == tok.pad_token_id).any()
        # the blocks' inner tokens are exactly the stream doc1 [SEP] doc2 [SEP] ..., cut where a full block ends
        stream = _stream(corpus.select(idx)["text"], tok)
        inner = ids[:, 1:-1].ravel()
        assert np.array_equal(inner, stream[: len(inner)]) and len(stream) - len(inner) < L - 2
        assert (inner == tok.sep_token_id).sum() == (stream[: len(inner)] == tok.sep_token_id).sum() > 0

        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
        assert np.array_equal(words == -1, special)
        pieces = np.array(tok.convert_ids_to_tokens(ids.ravel().tolist())).reshape(ids.shape)
        for b in range(len(ds)):
            prev = -1
            for j in range(1, L - 1):
                w = words[b, j]
                if w < 0:
                    continue
                new_word = w != prev if j > 1 and words[b, j - 1] >= 0 else True
                if new_word:
                    assert w == words[b, :j].max(initial=-1) + 1, "word ids count up from 0 without gaps"
                    if j > 1:  # the block's first token may be a continuation of a word cut by the block start
                        assert not pieces[b, j].startswith("##"), (b, j, pieces[b, max(0, j - 3): j + 1])
                else:
                    assert pieces[b, j].startswith("##"), "a new WordPiece word must get a new word id"
                prev = w


def test_block_dataset_items_and_pickling(prepared):
    _, data = prepared
    item = data.train[3]
    assert set(item) == {"input_ids", "word_ids"}
    assert item["input_ids"].dtype == torch.long and item["word_ids"].dtype == torch.long
    assert item["input_ids"].shape == (data.train.block_size,)
    assert data.train.input_ids.dtype == np.uint16 and data.train.word_ids.dtype == np.int16
    clone = pickle.loads(pickle.dumps(data.train))
    assert len(pickle.dumps(data.train)) < 2000, "memory-mapped blocks pickle as file paths"
    assert torch.equal(clone[3]["input_ids"], item["input_ids"]) and torch.equal(clone[3]["word_ids"], item["word_ids"])
    in_memory = BlockDataset(np.asarray(data.train.input_ids), np.asarray(data.train.word_ids))
    assert torch.equal(pickle.loads(pickle.dumps(in_memory))[0]["input_ids"], data.train[0]["input_ids"])


def test_unigram_counts_match_train_blocks(prepared):
    _, data = prepared
    expected = np.bincount(np.asarray(data.train.input_ids).ravel(), minlength=len(data.tokenizer))
    assert data.unigram_counts.dtype == np.int64 and np.array_equal(data.unigram_counts, expected)
    assert data.unigram_counts.sum() == data.train.num_tokens


def test_train_and_validation_documents_are_disjoint(prepared):
    cfg, data = prepared
    meta = data.meta["splits"]
    corpus = load_corpus(cfg.data)
    assert meta["train"]["documents"] + meta["validation"]["documents"] == len(corpus)
    train_idx, val_idx = split_documents(len(corpus), cfg.data.validation_fraction, cfg.train.seed)
    val_texts = set(corpus.select(val_idx)["text"])
    assert val_texts and not val_texts & set(corpus.select(train_idx)["text"])


def test_cache_reuse_and_invalidation(tmp_path, corpus_file, monkeypatch):
    cfg = make_cfg(tmp_path, [corpus_file])
    first = prepare_blocks(cfg)
    meta = json.loads((first.cache_path / "meta.json").read_text())
    assert meta["splits"]["train"]["blocks"] == len(first.train) and meta["block_size"] == 32
    assert not list(first.cache_path.glob("*.arrow")), "intermediate Arrow files are removed"

    # second call: memory-mapped from the cache, without reading the corpus or tokenizing
    monkeypatch.setattr(blocks_mod, "tokenize_documents", lambda *a, **k: pytest.fail("re-tokenized"))
    monkeypatch.setattr(blocks_mod, "load_corpus", lambda *a, **k: pytest.fail("re-read the corpus"))
    again = prepare_blocks(make_cfg(tmp_path, [corpus_file]))
    assert again.cache_path == first.cache_path
    assert isinstance(again.train.input_ids, np.memmap)
    assert np.array_equal(again.train.input_ids, first.train.input_ids)
    assert np.array_equal(again.validation.word_ids, first.validation.word_ids)
    monkeypatch.undo()

    bigger = prepare_blocks(make_cfg(tmp_path, [corpus_file], block_size=48))
    assert bigger.cache_path != first.cache_path and bigger.train.block_size == 48
    paths = {first.cache_path, bigger.cache_path}
    for changed in (make_cfg(tmp_path, [corpus_file], vocab_size=180),  # tokenizer
                    make_cfg(tmp_path, [corpus_file], seed=1),  # document split
                    make_cfg(tmp_path, [corpus_file], validation_fraction=0.2)):
        path = prepare_blocks(changed).cache_path
        assert path not in paths
        paths.add(path)


def test_corpus_too_small(tmp_path):
    write_jsonl(tmp_path / "small.jsonl", toy_docs(3, words=(3, 5)))
    with pytest.raises(CorpusTooSmallError, match=r"corpus too small for block_size 128: got \d+ tokens"):
        prepare_blocks(make_cfg(tmp_path, [tmp_path / "small.jsonl"], block_size=128, validation_fraction=0.0))


def test_literal_special_token_text_is_not_special(tmp_path):
    docs = [d + " see [MASK] and [SEP] here" for d in toy_docs(40)]
    data = prepare_blocks(make_cfg(tmp_path, [write_jsonl(tmp_path / "c.jsonl", docs)], validation_fraction=0.0))
    ids = np.asarray(data.train.input_ids)
    assert not (ids == data.tokenizer.mask_token_id).any()
    assert ((ids == data.tokenizer.sep_token_id).sum(1) >= 1).all()


def test_prepare_data_script(tmp_path, corpus_file, capsys):
    from pretrain.cli import prepare_data_main as main

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  files: [{corpus_file}]\n  block_size: 32\ntokenizer:\n  vocab_size: 200\n")
    assert main([str(config), f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_blocks"] > 0 and summary["vocab_size"] == 200 and summary["block_size"] == 32
    assert summary["train_tokens"] == 32 * summary["train_blocks"]
    assert main([str(config), "data.files=[missing.txt]"]) == 2
    assert "no file matches 'missing.txt'" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo corpus


def test_demo_parsers_offline():
    rst = """.. _label:

Title
=====

This paragraph has enough plain words to count as prose, with :func:`len` and ``code``.

.. code-block:: python

   print("dropped")

Another prose paragraph follows here, then a literal block::

   x = 1  # dropped

+-----+-----+
| a   | b   |
+-----+-----+

.. function:: spam(eggs)

   Return the spam of the given eggs, as described by :class:`~collections.abc.Mapping`.
""".splitlines()
    paragraphs = [p for p in demo_mod._rst_paragraphs(rst) if p]
    assert paragraphs == [
        "This paragraph has enough plain words to count as prose, with len and code.",
        "Another prose paragraph follows here, then a literal block:",
        "Return the spam of the given eggs, as described by Mapping.",
    ]
    entry = ('Allnight \\All"night`\\, n.\n'
             "   Light, fuel, or {food} for the whole night. [Obs.] --Bacon.\n   [1913 Webster]\n")
    assert demo_mod._gcide_clean(entry) == "Allnight, n. Light, fuel, or food for the whole night. [Obs.] --Bacon."
    assert len(demo_mod.WORDNET_LEXNAMES) == 45
    assert demo_mod.WORDNET_LEXNAMES[3] == "noun.Tops" and demo_mod.WORDNET_LEXNAMES[44] == "adj.ppl"


def test_demo_bible(bible_jsonl, demo_cache_dir, tmp_path):
    docs = [json.loads(line) for line in open(bible_jsonl)]
    assert len(docs) == 1189  # chapters of the KJV
    assert docs[0]["source"] == "bible:Genesis 1"
    assert docs[0]["text"].startswith("In the beginning God created the heaven and the earth. And the earth was")
    assert docs[-1]["source"] == "bible:Revelation 22" and docs[-1]["text"].endswith("be with you all. Amen.")
    assert not any(ch.isdigit() for ch in docs[0]["text"]), "verse numbers are stripped"
    assert "\n" not in docs[0]["text"]
    # present parts are not fetched again; the corpus loader reads them
    start = time.perf_counter()
    assert demo_mod.fetch_demo_corpus(demo_cache_dir, ["bible"])["bible"] == bible_jsonl
    assert time.perf_counter() - start < 1
    corpus = load_corpus(DataConfig(demo=["bible"], cache_dir=str(demo_cache_dir), max_documents=10))
    assert corpus.column_names == ["text"] and corpus[0]["text"] == docs[0]["text"]


def test_one_long_document_is_split_by_blocks(tmp_path):
    """A corpus of one document cannot be split by document: its last blocks become the validation split."""
    path = write_jsonl(tmp_path / "one.jsonl", [" ".join(toy_docs(60))])
    data = prepare_blocks(make_cfg(tmp_path, [path], validation_fraction=0.1))
    n_train, n_val = len(data.train), len(data.validation)
    assert data.meta["split_by"] == "blocks" and n_train > 0 and n_val == round(0.1 * (n_train + n_val))
    whole = prepare_blocks(make_cfg(tmp_path, [path], validation_fraction=0.0))  # every block in "train"
    stream = np.concatenate([np.asarray(data.train.input_ids), np.asarray(data.validation.input_ids)])
    assert np.array_equal(stream, np.asarray(whole.train.input_ids))
    assert np.array_equal(data.unigram_counts, np.bincount(np.asarray(data.train.input_ids).ravel(),
                                                           minlength=len(data.tokenizer)))


def test_validation_documents_shorter_than_a_block_fall_back_to_blocks(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", toy_docs(6, words=(20, 25)))
    data = prepare_blocks(make_cfg(tmp_path, [path], validation_fraction=0.1, block_size=64))
    assert data.meta["split_by"] == "blocks" and len(data.validation) >= 1 and len(data.train) >= 1
    again = prepare_blocks(make_cfg(tmp_path, [write_jsonl(tmp_path / "many.jsonl", toy_docs(120))]))
    assert again.meta["split_by"] == "documents"


def test_one_block_corpus_cannot_train_and_validate(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", toy_docs(1, words=(30, 30)))
    with pytest.raises(CorpusTooSmallError, match="two blocks .one to train on, one to validate.; add text or lower"):
        prepare_blocks(make_cfg(tmp_path, [path], validation_fraction=0.1, block_size=32))


@pytest.mark.parametrize("name, content, offset", [("bad.jsonl", b'{"text": "caf\xe9"}\n', 13),
                                                   ("bad.csv", b"text\ncaf\xe9\n", 8)])
def test_non_utf8_json_and_csv_name_the_file_and_offset(tmp_path, name, content, offset):
    from pretrain.data.corpus import CorpusEncodingError

    good = write_jsonl(tmp_path / "good.jsonl", toy_docs(3))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusEncodingError, match=rf"{name} is not UTF-8 text \(byte 0xe9 at offset {offset}\)"):
        load_corpus(data_cfg(tmp_path, files=[str(good), str(tmp_path / name)]))


# --------------------------------------------------------------------------- parallel preparation, progress


def _cache_files(path) -> dict:
    """Every file of a block cache (bytes), meta.json without the build's time and process count."""
    files = {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name != "meta.json"}
    meta = json.loads((path / "meta.json").read_text())
    return {**files, "meta": {k: v for k, v in meta.items() if k not in ("seconds", "num_proc")}}


@pytest.mark.parametrize("docs, block_size, split_by", [(toy_docs(120), 32, "documents"),
                                                        (toy_docs(6, words=(20, 25)), 64, "blocks")])
def test_blocks_are_byte_identical_for_any_num_proc(tmp_path, monkeypatch, docs, block_size, split_by):
    """Documents cross block boundaries and batches of at most 7 (or 2) documents, cut shorter by the byte budget,
    give every worker several shards, so a shard boundary that broke the stream (carry, [SEP], word ids, the split)
    would show."""
    from pretrain.data import tokenize as tokenize_mod

    monkeypatch.setattr(tokenize_mod, "TOKENIZE_BATCH_DOCS", 7 if split_by == "documents" else 2)
    monkeypatch.setattr(tokenize_mod, "TOKENIZE_BATCH_BYTES", 2 * max(len(d.encode()) for d in docs) - 1)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    built = {}
    for num_proc in (1, 2, 3):
        cfg = make_cfg(tmp_path, [path], block_size=block_size, num_proc=num_proc)
        data = prepare_blocks(cfg)
        assert data.meta["split_by"] == split_by and data.meta["num_proc"] == num_proc
        built[num_proc] = _cache_files(data.cache_path)
        shutil.rmtree(data.cache_path)  # the next one builds again
    assert built[1]["meta"]["splits"]["validation"]["blocks"] > 0
    assert built[2] == built[1] and built[3] == built[1]


def test_document_ranges_cover_the_documents_in_order_within_both_budgets():
    """Greedy runs of consecutive documents: no range over 4 documents or 100 bytes unless it is one document
    longer than that, and no range could have taken its successor's first document."""
    from datasets import Dataset

    from pretrain.data.tokenize import document_ranges

    rng = np.random.default_rng(0)
    texts = ["é" * int(n) for n in rng.integers(0, 80, size=200)] + ["x" * 500, "", "y" * 30]
    sizes = [len(t.encode()) for t in texts]  # "é" is 2 bytes: budgets count UTF-8 bytes, not characters
    ranges = list(document_ranges(Dataset.from_dict({"text": texts}), max_docs=4, max_bytes=100))
    assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == len(texts)
    for (lo, hi), following in zip(ranges, ranges[1:] + [None]):
        assert hi - lo <= 4 and (sum(sizes[lo:hi]) <= 100 or hi - lo == 1)
        if following is not None:  # greedy: the next document did not fit
            assert hi - lo == 4 or sum(sizes[lo:hi + 1]) > 100
    assert (200, 201) in ranges  # the 500-byte document alone
    assert list(document_ranges(Dataset.from_dict({"text": []}))) == []


def test_cache_made_with_one_process_is_reused_with_two(tmp_path, corpus_file, monkeypatch):
    first = prepare_blocks(make_cfg(tmp_path, [corpus_file], num_proc=1))
    monkeypatch.setattr(blocks_mod, "tokenize_documents", lambda *a, **k: pytest.fail("re-tokenized"))
    again = prepare_blocks(make_cfg(tmp_path, [corpus_file], num_proc=2))
    assert again.cache_path == first.cache_path and again.meta["num_proc"] == 1


def test_preparation_shows_progress_once(tmp_path, corpus_file, capsys):
    """Not a terminal (captured): a final line per step with its rate; a cached call prints nothing."""
    cfg = make_cfg(tmp_path, [corpus_file], num_proc=2)
    prepare_blocks(cfg)  # trains the tokenizer (on the Rust thread pool), then forks the tokenizing workers
    out, err = capsys.readouterr()
    assert "forked" not in out + err, "tokenizers warns when it forks after using its thread pool unconfigured"
    tokenizing = [line for line in err.splitlines() if line.startswith("tokenizing+packing: 100% 120/120 docs")]
    assert len(tokenizing) == 1 and re.search(r"\d+ tok, [\d.]+k? tok/s, elapsed .*, ETA", tokenizing[0]), err
    assert re.search(r"tokenizer: counting words: 100% 120/120 docs, \d+ char, [\d.]+[kM]? char/s", err), err
    prepare_blocks(cfg)
    assert capsys.readouterr().err == ""


def test_progress_lines_are_rate_limited_off_a_terminal(monkeypatch):
    import io

    from pretrain.data import progress as progress_mod

    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    with progress_mod.Progress("work", total=100, stream=stream) as progress:
        for _ in range(100):
            now[0] += 3.0  # an update every 3 s
            progress.update(1, tokens=50)
    lines = stream.getvalue().splitlines()
    # 100 updates over 300 s: a line every 4th update (>= 10 s apart) and the final one, not one per update
    assert len(lines) == 26 and lines[-1] == "work: 100% 100/100 docs, 5000 tok, 16.7 tok/s, elapsed 05:00, ETA 00:00"
    assert lines[0] == "work:   4% 4/100 docs, 200 tok, 16.7 tok/s, elapsed 00:12, ETA 04:48"


def test_npy_appender_and_truncate(tmp_path):
    from pretrain.data.npy import NpyAppender, truncate_npy

    path, rows = tmp_path / "a.npy", np.arange(40, dtype=np.uint16).reshape(8, 5)
    with NpyAppender(path, np.uint16, 5) as out:
        out.append(rows[:3])
        out.append(rows[3:].astype(np.int64))  # cast to the file's dtype
        with pytest.raises(ValueError, match=r"expected \[n, 5\]"):
            out.append(rows[:, :4])
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, rows)
    del loaded
    truncate_npy(path, 2)
    assert np.array_equal(np.load(path), rows[:2])
    assert path.stat().st_size == np.load(path).nbytes + 128  # header, then exactly the kept rows
    with NpyAppender(tmp_path / "empty.npy", np.int16, 7):
        pass
    assert np.load(tmp_path / "empty.npy").shape == (0, 7)


def test_progress_on_a_terminal_is_a_tqdm_bar():
    import io

    from pretrain.data.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress("work", total=10, stream=stream) as progress:
        for _ in range(10):
            progress.update(1, tokens=1000)
    out = stream.getvalue()
    assert out.startswith("\rwork:   0%|") and re.search(r"\rwork: 100%\|#+\| 10/10 docs \[00:00<00:00, [\d.]+[kMG]? tok/s\]\n$", out), out


def test_sharded_appender_open_and_truncate(tmp_path, monkeypatch):
    from pretrain.data import npy as npy_mod

    monkeypatch.setattr(npy_mod, "SHARD_TOKENS", 10)  # 2 rows of width 5 per shard
    rows = np.arange(35, dtype=np.int64).reshape(7, 5)
    with npy_mod.ShardedAppender(tmp_path, "a", np.uint16, 5) as out:
        out.append(rows[:3])
        out.append(rows[3:])
        with pytest.raises(ValueError, match=r"expected \[n, 5\]"):
            out.append(rows[:, :4])
    assert out.rows == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a-{i:05d}.npy" for i in range(4)]
    assert [np.load(p).shape[0] for p in npy_mod.shard_paths(tmp_path, "a")] == [2, 2, 2, 1]
    sharded = npy_mod.open_rows(tmp_path, "a")
    assert isinstance(sharded, npy_mod.ShardedRows) and sharded.shape == (7, 5) and sharded.size == 35
    assert sharded.dtype == np.uint16 and np.array_equal(np.asarray(sharded), rows)
    assert all(np.array_equal(sharded[i], rows[i]) for i in range(-7, 7))
    for a, b in ((1, 6), (5, 100), (3, 3), (0, 7), (6, 7)):
        assert np.array_equal(sharded[a:b], rows[a:b]), (a, b)
    with pytest.raises(IndexError):
        sharded[7]
    del sharded
    npy_mod.truncate_rows(tmp_path, "a", 3)  # cut inside the second shard; the third and fourth go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-00000.npy", "a-00001.npy"]
    assert np.array_equal(np.asarray(npy_mod.open_rows(tmp_path, "a")), rows[:3])
    npy_mod.truncate_rows(tmp_path, "a", 1)  # one shard left: the single-file layout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    single = npy_mod.open_rows(tmp_path, "a")
    assert isinstance(single, np.memmap) and np.array_equal(single, rows[:1])
    with npy_mod.ShardedAppender(tmp_path, "b", np.int16, 5) as out:  # fits one shard: b.npy, no shard names
        out.append(rows[:2])
    assert np.array_equal(np.load(tmp_path / "b.npy"), rows[:2]) and not list(tmp_path.glob("b-*"))
    with npy_mod.ShardedAppender(tmp_path, "a", np.uint16, 5) as out:  # written anew: a.npy goes
        out.append(rows[:5])
    assert sorted(p.name for p in tmp_path.glob("a*")) == ["a-00000.npy", "a-00001.npy", "a-00002.npy"]
    (tmp_path / "a-00001.npy").rename(tmp_path / "c-00001.npy")
    with pytest.raises(FileNotFoundError, match="no complete run of shards"):
        npy_mod.open_rows(tmp_path, "c")


@pytest.mark.parametrize("docs, split_by", [(toy_docs(120), "documents"), ([" ".join(toy_docs(60))], "blocks")])
@pytest.mark.parametrize("shard_blocks", [1, 3])
def test_sharded_cache_holds_the_blocks_of_the_unsharded_one(tmp_path, monkeypatch, docs, split_by, shard_blocks):
    """The shard size lowered to 1 or 3 blocks: every split is several files (the split by blocks moves the last
    blocks across shards and deletes the emptied ones), read back as the very blocks, counts and meta of the
    single-file cache (the layout written before sharding), with 1 and 2 processes, under the same cache key."""
    from pretrain.data import npy as npy_mod
    from pretrain.data import tokenize as tokenize_mod

    monkeypatch.setattr(tokenize_mod, "TOKENIZE_BATCH_DOCS", 7)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    single = prepare_blocks(make_cfg(tmp_path, [path], num_proc=1))
    assert single.meta["split_by"] == split_by
    expected = _cache_files(single.cache_path)
    blocks = {s: (np.array(d.input_ids), np.array(d.word_ids)) for s, d in (("train", single.train),
                                                                            ("validation", single.validation))}
    assert len(blocks["validation"][0]) > 3 and sorted(expected) == ["meta", "train_input_ids.npy",
                                                                      "train_word_ids.npy", "unigram_counts.npy",
                                                                      "validation_input_ids.npy",
                                                                      "validation_word_ids.npy"]
    key = single.cache_path
    del single
    shutil.rmtree(key)
    monkeypatch.setattr(npy_mod, "SHARD_TOKENS", shard_blocks * 32)
    for num_proc in (1, 2):
        data = prepare_blocks(make_cfg(tmp_path, [path], num_proc=num_proc))
        assert data.cache_path == key
        names = {p.name for p in key.iterdir()}
        for name, split in (("train", data.train), ("validation", data.validation)):
            n_shards = -(-len(blocks[name][0]) // shard_blocks)
            assert {f"{name}_{c}-{i:05d}.npy" for c in ("input_ids", "word_ids") for i in range(n_shards)} <= names
            assert f"{name}_input_ids-{n_shards:05d}.npy" not in names and f"{name}_input_ids.npy" not in names
            assert isinstance(split.input_ids, npy_mod.ShardedRows) and len(split.input_ids.shards) == n_shards
            assert np.array_equal(np.asarray(split.input_ids), blocks[name][0])
            assert np.array_equal(np.asarray(split.word_ids), blocks[name][1])
            clone = pickle.loads(pickle.dumps(split))
            for i in range(len(split)):
                assert np.array_equal(clone[i]["input_ids"].numpy(), blocks[name][0][i])
                assert np.array_equal(split[i]["word_ids"].numpy(), blocks[name][1][i])
        got = _cache_files(key)
        assert got["meta"] == expected["meta"] and got["unigram_counts.npy"] == expected["unigram_counts.npy"]
        del data, split, clone
        shutil.rmtree(key)
