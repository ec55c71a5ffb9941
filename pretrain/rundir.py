"""The run directory: one run at a time (a lock), refuse one that holds a different run, save the resolved config,
fit the tokenizer."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .config import Config, ConfigError, config_differences, config_to_dict, save_config

logger = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The output directory holds a different run, or cannot hold one."""


class RunDirLocked(RunDirError):
    """Another live run holds the output directory."""


def lock_path(output_dir: str | Path) -> Path:
    """The lock of ``output_dir``: a sibling file ``OUTPUT_DIR.lock``, so ``--overwrite`` moving the old run aside
    never moves the lock with it."""
    out = Path(output_dir).resolve()
    return out.with_name(out.name + ".lock")


def holder_alive(holder: dict) -> bool:
    """False only for a lock written on this host by a process that no longer runs (a killed run; a zombie, killed
    but not yet reaped, counts as gone)."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux), or it just ended: the signal said alive


def take_lock(path: Path) -> None:
    """Create ``path`` holding this process' pid, host and start time; refuse a live holder's lock and take over a
    stale one (with a note)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for _ in range(2):
        try:
            with open(path, "x") as f:
                json.dump(me, f)
            return
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {"pid": "?", "host": "?", "since": "?"}  # being written, or damaged: treat as held
        if holder_alive(holder):
            raise RunDirLocked(
                f"{path.with_suffix('')} is in use by pid {holder['pid']} on {holder['host']} since "
                f"{holder['since']} (lock {path}); wait for that run to end or use another output_dir "
                "(if that process is gone, delete the lock file)")
        print(f"taking over the stale lock {path} of pid {holder['pid']} (started {holder['since']}, "
              "no longer running)", flush=True)
        remove_stale(path, holder)
    raise RunDirLocked(f"could not take the lock {path}: another run is starting on it; retry")


def remove_stale(path: Path, holder: dict) -> None:
    """Delete the lock ``path`` of the dead ``holder`` unless another run took it over meanwhile: under ``flock``
    the file must still be the one opened and still name ``holder`` (two runs restarted at once must not delete
    each other's new lock)."""
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino and json.loads(f.read() or "null") == holder:
                path.unlink()
    except (FileNotFoundError, ValueError):
        pass  # removed or replaced by another run: the next attempt to create the lock decides


@contextmanager
def run_dir_lock(output_dir: str | Path, is_main: bool):
    """Hold ``output_dir``'s lock for the body: only the main process of a launch takes it (the others of the same
    launch share it), and releases it at the end, on an exception too."""
    if not is_main:
        yield
        return
    path = lock_path(output_dir)
    take_lock(path)
    try:
        yield
    finally:
        release_lock(path)


def release_lock(path: Path) -> None:
    """Remove ``path`` if this process still holds it."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass  # gone or replaced: nothing of ours to release


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
