"""Atomic, resumable checkpoints: ``checkpoints/step-N/`` holding accelerate's state (model, optimizer, grad scaler,
RNG of every process), ``trainer_state.json`` (step, data position, counters) and a ``COMPLETE`` marker written last.

A checkpoint is assembled in ``.step-N.tmp`` and renamed into place, so a crash never leaves a ``step-N`` that
cannot be loaded; older complete checkpoints are pruned only after a newer one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names it and the fix."""


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All ``step-N`` directories under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint, which must be complete: an incomplete or unreadable newest checkpoint is an error,
    never a silent restart from scratch (nor a silent fall-back that would throw away training)."""
    found = list_checkpoints(root)
    if not found:
        return None
    step, path = found[-1]
    if not (path / COMPLETE).is_file() or not (path / STATE_FILE).is_file():
        older = [p.name for s, p in found[:-1] if (p / COMPLETE).is_file()]
        hint = f"move it away to resume from {older[-1]}" if older else "move it away to start from scratch"
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no {COMPLETE} marker); {hint}")
    return path


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {e}; the checkpoint {path} is corrupt") from e


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every process calls it. Returns the final ``step-N`` path."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step}.tmp"
    final = root / f"step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from a crash while writing this very step
    accelerator.wait_for_everyone()
    # tied weights (MLM decoder = word embeddings, ELECTRA's shared embeddings) are stored once and re-tied on load,
    # which accelerate reports as a warning on every save; resume is tested bit-exact, so keep the log quiet
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(root, step, tmp, state, keep_last)
    accelerator.wait_for_everyone()
    return final


def commit_checkpoint(root: Path, step: int, tmp: Path, state: dict, keep_last: int) -> Path:
    """Turn the filled temporary directory ``tmp`` into ``root/step-N``: write the trainer state and the COMPLETE
    marker, rename it into place (a re-saved step keeps the old one until the new one is in place), then prune
    complete checkpoints beyond the newest ``keep_last``. Main process only."""
    final = root / f"step-{step}"
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    (tmp / COMPLETE).write_text("ok\n")
    if final.exists():
        old = root / f".step-{step}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    complete = [p for _, p in list_checkpoints(root) if (p / COMPLETE).is_file()]
    for path in complete[:-keep_last]:
        shutil.rmtree(path)
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model/optimizer/scaler/RNG state in place and return the trainer state."""
    state = read_state(path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means the files are unusable; name them
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    return state
