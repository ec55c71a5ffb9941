"""Corpus loading: local files, a hub dataset and/or the demo corpus -> one ``datasets.Dataset`` with a ``text`` column.

``load_corpus(data_cfg)`` concatenates, in this order, the demo parts (``data.demo``), the local files
(``data.files``: .txt one document per line, .json/.jsonl, .csv, .parquet, optionally .gz/.bz2/.xz/.zst compressed;
globs allowed) and a hub dataset (``data.dataset``), keeps only the text column (renamed to ``text``), drops empty
documents and keeps the first ``data.max_documents``. Every failure raises one error naming the problem and the fix.
``corpus_fingerprint(data_cfg)`` identifies the corpus for the caches without reading it.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import datasets
from datasets import Dataset, Value

from .demo import DEMO_FORMAT_VERSION, GCIDE_MAX_BYTES, fetch_demo_corpus

logger = logging.getLogger(__name__)

#: bump when loading/filtering changes the documents produced from the same inputs
CORPUS_FORMAT_VERSION = 1

#: file extension -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class CorpusError(ValueError):
    """The corpus cannot be loaded as configured; the message names the problem and the fix."""


class UnsupportedFileError(CorpusError):
    pass


class MissingTextColumnError(CorpusError):
    pass


class EmptyCorpusError(CorpusError):
    pass


class CorpusEncodingError(CorpusError):
    pass


class DatasetUnavailableError(CorpusError):
    pass


def expand_cache_dir(data_cfg) -> Path:
    return Path(data_cfg.cache_dir).expanduser()


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand ``data.files`` (paths or globs, ``~`` allowed) into existing files, in order, without duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        else:
            matches = [Path(expanded)] if os.path.isfile(expanded) else []
        if not matches:
            where = "" if os.path.isabs(expanded) else f" (relative to the working directory {os.getcwd()})"
            raise FileNotFoundError(f"data.files: no file matches '{pattern}'{where}; check the path or the glob")
        files += matches
    return list(dict.fromkeys(p.resolve() for p in files))


def builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in BUILDERS:
        raise UnsupportedFileError(
            f"data.files: cannot read '{path}' (extension '{ext or 'none'}'); supported: "
            f"{', '.join(sorted(BUILDERS))} (optionally compressed {', '.join(COMPRESSIONS)}); convert it or rename it"
        )
    return BUILDERS[ext]


def load_corpus(data_cfg) -> Dataset:
    """All configured sources as one Dataset with the single column ``text`` (non-empty documents only)."""
    parts: list[Dataset] = []
    hf_cache = str(expand_cache_dir(data_cfg) / "hf-datasets")
    if data_cfg.demo:
        paths = fetch_demo_corpus(expand_cache_dir(data_cfg), data_cfg.demo)
        files = [str(paths[p]) for p in data_cfg.demo]
        parts.append(_text_only(_load_files("json", files, hf_cache), "text", "the demo corpus"))
    if data_cfg.files:
        for builder, group in _consecutive_groups(resolve_files(data_cfg.files)):
            column = "text" if builder == "text" else data_cfg.text_column
            where = f"data.files {group[0].name}" + (f" (+{len(group) - 1} more)" if len(group) > 1 else "")
            parts.append(_text_only(_load_files(builder, [str(p) for p in group], hf_cache), column, where))
    if data_cfg.dataset:
        hub = _load_hub(data_cfg.dataset, data_cfg.dataset_config, data_cfg.split)
        parts.append(_text_only(hub, data_cfg.text_column, f"data.dataset '{data_cfg.dataset}'"))
    if not parts:
        raise CorpusError("no corpus: set data.files (local files), data.dataset (hub name) or data.demo")

    corpus = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    n_loaded = len(corpus)
    try:
        corpus = corpus.filter(_non_empty, batched=True, batch_size=10_000, desc="dropping empty documents")
    except UnicodeDecodeError as e:  # the json builder keeps invalid UTF-8 bytes in its strings
        if not data_cfg.files:
            raise
        raise _encoding_error([str(p) for p in resolve_files(data_cfg.files)], e) from e
    if len(corpus) == 0:
        raise EmptyCorpusError(
            f"the corpus is empty: {n_loaded} documents were read but none has non-whitespace text; check "
            f"data.text_column ('{data_cfg.text_column}') and the files"
        )
    if data_cfg.max_documents is not None and data_cfg.max_documents < len(corpus):
        corpus = corpus.select(range(data_cfg.max_documents))
    logger.info("corpus: %d documents (%d read, empty ones dropped)", len(corpus), n_loaded)
    return corpus


def corpus_fingerprint(data_cfg) -> str:
    """A hash of what determines the corpus: resolved files with sizes and mtimes, demo parts, hub name/config/split,
    text column and max_documents. It reads no document (the demo parts are fetched if missing)."""
    state: dict = {
        "format": CORPUS_FORMAT_VERSION,
        "text_column": data_cfg.text_column,
        "max_documents": data_cfg.max_documents,
    }
    if data_cfg.demo:
        paths = fetch_demo_corpus(expand_cache_dir(data_cfg), data_cfg.demo)
        # demo files are rebuilt deterministically, so their size (not their mtime) identifies them
        state["demo"] = [[p, DEMO_FORMAT_VERSION, GCIDE_MAX_BYTES, paths[p].stat().st_size] for p in data_cfg.demo]
    if data_cfg.files:
        state["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_files(data_cfg.files)]
    if data_cfg.dataset:
        state["dataset"] = [data_cfg.dataset, data_cfg.dataset_config, data_cfg.split]
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- helpers


def _consecutive_groups(files: list[Path]) -> Iterator[tuple[str, list[Path]]]:
    """Runs of consecutive files that share a builder (mixed extensions are loaded run by run, order kept)."""
    group: list[Path] = []
    current = None
    for path in files:
        builder = builder_for(path)
        if group and builder != current:
            yield current, group
            group = []
        current = builder
        group.append(path)
    if group:
        yield current, group


def _load_files(builder: str, files: list[str], cache_dir: str) -> Dataset:
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        causes = _causes(e)
        bad_text = next((c for c in causes if isinstance(c, UnicodeDecodeError)), None)
        if bad_text is not None:
            raise _encoding_error(files, bad_text) from e
        if any(type(c).__name__ == "SchemaInferenceError" for c in causes):
            raise EmptyCorpusError(f"data.files: {_names(files)} holds no document (empty file); add text to it or "
                                   "remove it from data.files") from e
        os_error = next((c for c in causes if isinstance(c, OSError)), None)
        if os_error is not None:  # e.g. a full disk under data.cache_dir: the CLI names it
            raise os_error from e
        raise


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _names(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"


def _encoding_error(files: list[str], error: UnicodeDecodeError) -> CorpusError:
    """Name the first file of ``files`` that is not UTF-8, with the byte offset, and how to re-encode it."""
    for path in files:
        offset = first_invalid_utf8(Path(path))
        if offset is not None:
            with open(path, "rb") as f:
                f.seek(offset)
                byte = f.read(1)
            return CorpusEncodingError(
                f"data.files: {path} is not UTF-8 text (byte 0x{byte.hex()} at offset {offset}); re-encode it, "
                f"e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8{Path(path).suffix}")
    return CorpusEncodingError(f"data.files: {_names(files)} is not UTF-8 text ({error.reason}); re-encode it to "
                               "UTF-8 (e.g. with iconv)")


def first_invalid_utf8(path: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence of the (uncompressed) file ``path``, or None."""
    if path.suffix.lower() in COMPRESSIONS:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0  # bytes fed to the decoder so far
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                return done - pending + e.start
            if not data:
                return None
            done += len(data)


def _text_only(ds: Dataset, column: str, where: str) -> Dataset:
    """Keep ``column`` only, renamed to ``text`` and cast to string."""
    if column not in ds.column_names:
        raise MissingTextColumnError(
            f"{where}: no column '{column}' (columns present: {', '.join(ds.column_names)}); set data.text_column "
            "to the column that holds the text"
        )
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    feature = ds.features["text"]
    if not isinstance(feature, Value):
        raise MissingTextColumnError(
            f"{where}: column '{column}' holds {feature}, not text; set data.text_column to a column of strings"
        )
    if feature.dtype != "string":
        ds = ds.cast_column("text", Value("string"))
    return ds


def _non_empty(batch: dict) -> list[bool]:
    return [bool(t) and not t.isspace() for t in batch["text"]]


def _env_offline() -> bool:
    values = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    return any(v.upper() in {"1", "ON", "YES", "TRUE"} for v in values)


@contextlib.contextmanager
def _offline_mode_from_env():
    """Honour HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set after `datasets` was imported (it reads them at import time),
    so an offline lookup fails at once instead of retrying the network."""
    import huggingface_hub.constants as hub_constants

    if not _env_offline() or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, config: str | None, split: str) -> Dataset:
    with _offline_mode_from_env():
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except (OSError, datasets.exceptions.DatasetsError) as e:  # ConnectionError, FileNotFoundError, ...
            if offline:
                raise DatasetUnavailableError(
                    f"data.dataset '{name}' (config {config!r}, split '{split}') is not in the local datasets cache "
                    f"({datasets.config.HF_DATASETS_CACHE}) and offline mode is on (HF_HUB_OFFLINE/"
                    "HF_DATASETS_OFFLINE): download it once with network access, or use local files (data.files)"
                ) from e
            raise DatasetUnavailableError(
                f"could not load data.dataset '{name}' (config {config!r}, split '{split}'): {type(e).__name__}: {e}. "
                "Check the name and the network, or use local files (data.files)"
            ) from e
    if isinstance(ds, datasets.DatasetDict):  # defensive: split=None-like configs
        raise CorpusError(f"data.dataset '{name}' returned several splits {list(ds)}; set data.split")
    return ds
