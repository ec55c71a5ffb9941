"""Command-line entry points (thin: parse, then call the library). Also installed as console scripts."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time

# the tokenizers library warns on every DataLoader fork once it has been used; its threads are not needed there
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pretrain_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain an encoder: pretrain CONFIG.yaml [key.sub=value ...]")
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 output_dir=runs/x")
    parser.add_argument("--overwrite", action="store_true",
                        help="if OUTPUT_DIR holds a run with another config, move it aside and start afresh")
    args = parser.parse_intermixed_args(argv)  # --overwrite may come anywhere among the overrides

    import datasets

    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    from .rundir import RunDirError
    from .trainer import fit

    datasets.disable_progress_bars()  # one progress line is ours; data preparation logs its stages instead
    log = logging.getLogger("pretrain")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        fit(cfg, overwrite=args.overwrite)
    except (ConfigError, RunDirError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e, cfg.output_dir if cfg else None)}", file=sys.stderr)
        return 2
    return 0


def os_error_message(e: OSError, fallback: str | None = None) -> str:
    """One line naming the file an OS call failed on (``fallback``: the folder written to, when the error names
    none), the cause and the fix (a full disk says how much is free)."""
    path = e.filename or fallback or os.getcwd()
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device holding {path} ({_free_space(path)} free): free some space, or set "
                "output_dir / data.cache_dir to a disk with room")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path} ({e.strerror}): fix the folder's permissions, or set output_dir / "
                "data.cache_dir to a writable folder")
    return f"{path}: {e.strerror or e}"


def _free_space(path: str) -> str:
    """Free space of the file system holding ``path`` (its nearest existing parent), e.g. '1.2 GB'."""
    import shutil
    from pathlib import Path

    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    free = float(shutil.disk_usage(existing).free)
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024:
            return f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TB"


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain-export", description="Export a checkpoint of a run to stock transformers directories")
    parser.add_argument("run_dir", help="a pretraining OUTPUT_DIR")
    parser.add_argument("--checkpoint", help="checkpoints/step-N to export (default: the newest complete one)")
    parser.add_argument("--out", help="export directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError
    from .export import export_checkpoint

    try:
        path = export_checkpoint(args.run_dir, args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {path}")
    return 0


def prepare_data_main(argv: list[str] | None = None) -> int:
    """Tokenize and pack a corpus into the block cache (the data half of a run); prints a JSON summary."""
    parser = argparse.ArgumentParser(prog="pretrain-prepare-data", description=prepare_data_main.__doc__)
    parser.add_argument("config", help="YAML config (only its data/tokenizer sections and train.seed matter)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.block_size=256")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from .config import ConfigError, load_config
    from .data import prepare_blocks
    from .data.demo import DemoCorpusError

    start = time.perf_counter()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        data = prepare_blocks(cfg)
    except (ConfigError, ValueError, FileNotFoundError, DemoCorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e, cfg.data.cache_dir if cfg else None)}", file=sys.stderr)
        return 2
    splits = data.meta["splits"]
    summary = {
        "cache_path": str(data.cache_path),
        "tokenizer": data.tokenizer.name_or_path,
        "vocab_size": len(data.tokenizer),
        "block_size": data.train.block_size,
        "train_blocks": len(data.train),
        "train_tokens": data.train.num_tokens,
        "train_documents": splits["train"]["documents"],
        "validation_blocks": len(data.validation),
        "validation_tokens": data.validation.num_tokens,
        "validation_documents": splits["validation"]["documents"],
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(summary))
    return 0
