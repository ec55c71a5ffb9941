"""The run directory: refuse one that holds a different run, save the resolved config, fit the tokenizer."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .config import Config, ConfigError, config_differences, config_to_dict, save_config

logger = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The output directory holds a different run, or cannot hold one."""


def prepare_run_dir(cfg: Config, overwrite: bool, is_main: bool) -> Path:
    """Create the output dir, refusing one that holds a run with a different config. ``overwrite`` moves the old
    run aside to ``OUTPUT_DIR.bak-<time>`` (nothing is deleted) and starts afresh. The config is saved later, by
    :func:`save_run_config`, once the run has passed its checks: a run that failed before has no config to keep."""
    check_training_config(cfg, warn=is_main)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out} is a file, not a directory: set output_dir to a new path")
    saved = out / "config.yaml"
    if saved.is_file():
        import yaml

        old = yaml.safe_load(saved.read_text()) or {}
        diffs = config_differences(old, config_to_dict(cfg))
        if diffs and not overwrite:
            raise RunDirError(
                f"{out} holds a run with a different config:\n  " + "\n  ".join(diffs)
                + "\nuse a new output_dir, or pass --overwrite to move the old run aside"
            )
        if diffs and is_main:
            backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(out), str(backup))
            print(f"moved the previous run to {backup}", flush=True)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise RunDirError(f"output_dir {out} is not writable: fix its permissions or set output_dir elsewhere")
    return out


def check_training_config(cfg: Config, warn: bool = True) -> None:
    """What a valid config may still get wrong for training: refuse what cannot train, warn (with ``warn``: on one
    process of a launch) about what trains badly."""
    if cfg.data.validation_fraction == 0:
        raise ConfigError("data.validation_fraction is 0, but training evaluates on the validation split (at least at "
                          "the end): set it > 0, e.g. data.validation_fraction=0.01 (a corpus of too few documents "
                          "is split by blocks)")
    t = cfg.train
    if warn and t.schedule != "onecycle" and t.warmup_steps >= t.max_steps:
        logger.warning("train.warmup_steps (%d) >= train.max_steps (%d): the run ends before the LR warmup does "
                       "(the LR never decays); lower train.warmup_steps, e.g. to %d", t.warmup_steps,
                       t.max_steps, max(1, t.max_steps // 10))


def save_run_config(cfg: Config, out: Path) -> None:
    """Save the resolved config as ``out/config.yaml``: from now on the run directory belongs to this config."""
    save_config(cfg, out / "config.yaml")


def check_tokenizer(cfg: Config, tokenizer):
    """Fit the tokenizer to the model (max length = position count) and refuse a vocabulary-size mismatch."""
    tokenizer.model_max_length = cfg.model.max_position_embeddings
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != len(tokenizer):
        raise ValueError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer has {len(tokenizer)} tokens; "
                         "set model.vocab_size to null (use the tokenizer's) or point tokenizer.path at the right one")
    return tokenizer
