"""Command-line entry points (thin: parse, then call the library). Also installed as console scripts."""

from __future__ import annotations

import argparse
import sys


def pretrain_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain an encoder: pretrain CONFIG.yaml [key.sub=value ...]")
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 output_dir=runs/x")
    parser.add_argument("--overwrite", action="store_true",
                        help="if OUTPUT_DIR holds a run with another config, move it aside and start afresh")
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    from .trainer import RunDirError, fit

    try:
        cfg = load_config(args.config, args.overrides)
        fit(cfg, overwrite=args.overwrite)
    except (ConfigError, RunDirError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
