"""Atomic, verified, pickle-free checkpoints: ``checkpoints/step-N/`` holding the model (safetensors), the optimizer,
grad scaler and registered extras (``torch.save`` of tensors and plain types, read back with ``weights_only=True``),
every process' RNG state (JSON), ``trainer_state.json`` (step, data position, counters) and a ``COMPLETE`` marker
written last: JSON with the sha256 of every other file of the checkpoint.

A checkpoint is assembled in ``.step-N.tmp``, its files and directories fsynced, and renamed into place, so a crash
never leaves a ``step-N`` that cannot be loaded; older complete checkpoints are pruned only after a newer one is
complete. Before loading, every file is checked against the marker's checksums; a file that is missing, differs, or
does not load is reported as damaged, naming the previous complete checkpoint as the way out. No file is ever
unpickled into arbitrary objects.

Checkpoints of the earlier format (accelerate's ``save_state``: marker ``ok``, no checksums, RNG in
``random_states_{i}.pkl``) load without verification; their RNG pickle is read with ``weights_only=True`` allowing
only NumPy's array reconstruction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE = "model.safetensors", "optimizer.bin", "scaler.pt"
RNG_FILE = "rng_state_{}.json"  # one per process
LEGACY_RNG_FILE = "random_states_{}.pkl"  # accelerate's, in checkpoints written before checksums
EXTRA_FILE = "custom_checkpoint_{}.pkl"  # accelerate's name for registered objects, kept: older checkpoints load
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: trainer-state key naming the phase of a hybrid run (``decouple.until_step``) that wrote the checkpoint: "backprop"
#: after the switch (the stitched model's checkpoint); absent before it (the decoupled chunks')
PHASE_KEY = "phase"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names it and the fix."""


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All ``step-N`` directories under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def way_out(path: Path) -> str:
    """What to do about the unusable checkpoint ``path``: resume from the previous complete one, or start over."""
    m = _STEP_DIR.match(path.name)
    older = [p.name for s, p in list_checkpoints(path.parent)
             if m and s < int(m.group(1)) and (p / COMPLETE).is_file()]
    return f"move it away to resume from {older[-1]}" if older else "move it away to start from scratch"


def damaged(path: Path, file: Path, why: str) -> CheckpointError:
    """The error for ``file`` of checkpoint ``path`` being unusable."""
    return CheckpointError(f"checkpoint {path} is damaged: {file.relative_to(path)} {why}; {way_out(path)}")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint, which must be complete: an incomplete or unreadable newest checkpoint is an error,
    never a silent restart from scratch (nor a silent fall-back that would throw away training)."""
    found = list_checkpoints(root)
    if not found:
        return None
    step, path = found[-1]
    if not (path / COMPLETE).is_file() or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no {COMPLETE} marker); {way_out(path)}")
    return path


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {e}; the checkpoint {path} is corrupt; "
                              f"{way_out(path)}") from e


# ------------------------------------------------------------------ checksums


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the marker, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != COMPLETE)


def write_marker(directory: Path) -> None:
    """Fsync every file of ``directory``, then write and fsync the ``COMPLETE`` marker holding their sha256, then
    fsync the directories: once the marker is on disk, so is everything it names."""
    files = _files(directory)
    for rel in files:
        _fsync(directory / rel)
    marker = {"format": 2, "sha256": {rel: _sha256(directory / rel) for rel in files}}
    (directory / COMPLETE).write_text(json.dumps(marker, indent=1) + "\n")
    _fsync(directory / COMPLETE)
    for sub in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync(sub)


def verify_checkpoint(path: Path, parts: list[str] | None = None) -> None:
    """Check the files of checkpoint ``path`` (only those under the top-level entries ``parts``, None: all) against
    the marker's checksums. A marker without checksums (``ok``, the earlier format) verifies nothing."""
    with loading(path, path / COMPLETE):
        text = (path / COMPLETE).read_text()
    if text.strip() == "ok":
        return
    try:
        checksums = json.loads(text)["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise damaged(path, path / COMPLETE, f"is not a checkpoint marker ({e})") from e
    for rel, digest in checksums.items():
        if parts is not None and rel.split("/")[0] not in parts:
            continue
        file = path / rel
        if not file.is_file():
            raise damaged(path, file, "is missing")
        if _sha256(file) != digest:
            raise damaged(path, file, "does not match the checksum written with it (truncated or overwritten)")


# ------------------------------------------------------------------ files of tensors and plain types


def load_tensors(path: Path, file: Path):
    """``torch.load(file, weights_only=True)``: tensors and plain Python types only, so a planted object can never
    run; any failure is a CheckpointError naming ``file`` of checkpoint ``path``."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or not tensors-only: never loaded
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise damaged(path, file, f"does not load as tensors and plain types (weights_only; any other "
                                  f"object is refused, never unpickled) ({type(e).__name__}: {first})") from e


@contextmanager
def loading(path: Path, file: Path):
    """Any exception while reading or applying ``file`` of checkpoint ``path`` becomes a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable; name it
        raise damaged(path, file, f"does not load ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------ RNG state as JSON


def rng_state() -> dict:
    """This process' Python, NumPy, torch CPU and CUDA generator states as plain JSON types."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    import numpy as np
    import torch

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _legacy_rng_state(path: Path, file: Path) -> dict:
    """accelerate's ``random_states_{i}.pkl`` as :func:`rng_state`'s dict, unpickled with ``weights_only=True`` and
    only NumPy's array reconstruction allowed."""
    import codecs

    import numpy as np
    import torch

    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]
    with torch.serialization.safe_globals(allowed):
        states = load_tensors(path, file)
    with loading(path, file):
        version, mt, gauss = states["random_state"]
        name, keys, pos, has_gauss, cached = states["numpy_random_seed"]
        cuda = [s.tolist() for s in states.get("torch_cuda_manual_seed", [])]
        return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
                "torch": states["torch_manual_seed"].tolist(), "cuda": cuda}


def _read_rng_state(path: Path, index: int) -> dict:
    file = path / RNG_FILE.format(index)
    if not file.is_file() and (path / LEGACY_RNG_FILE.format(index)).is_file():
        return _legacy_rng_state(path, path / LEGACY_RNG_FILE.format(index))
    with loading(path, file):
        return json.loads(file.read_text())


# ------------------------------------------------------------------ backprop checkpoints


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep_last: int, module, optimizer,
                    extras: list = ()) -> Path:
    """Collective: every process calls it with its prepared ``module`` and ``optimizer``; ``extras``: objects with
    ``state_dict``/``load_state_dict`` of tensors (EWC). Returns the final ``step-N`` path."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step}.tmp"
    final = root / f"step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from a crash while writing this very step
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.mkdir()
        _save_shared(accelerator, tmp, module, optimizer, extras)
    accelerator.wait_for_everyone()
    (tmp / RNG_FILE.format(accelerator.process_index)).write_text(json.dumps(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(root, step, tmp, state, keep_last)
    accelerator.wait_for_everyone()
    return final


def _save_shared(accelerator, tmp: Path, module, optimizer, extras) -> None:
    """What every process holds alike: the model (as accelerate stores it: unwrapped from DDP, tied tensors once),
    the optimizer, the grad scaler and the extras."""
    import torch
    from accelerate.utils import save

    # tied weights (MLM decoder = word embeddings, ELECTRA's shared embeddings) are stored once and re-tied on load,
    # which accelerate reports as a warning on every save; resume is tested bit-exact, so keep the log quiet
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    save(accelerator.unwrap_model(module).state_dict(), tmp / MODEL_FILE, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if accelerator.scaler is not None:
        torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
    for i, extra in enumerate(extras):
        torch.save(extra.state_dict(), tmp / EXTRA_FILE.format(i))


def commit_checkpoint(root: Path, step: int, tmp: Path, state: dict, keep_last: int) -> Path:
    """Turn the filled temporary directory ``tmp`` into ``root/step-N``: write the trainer state and the COMPLETE
    marker with every file's checksum, fsync, rename it into place (a re-saved step keeps the old one until the new
    one is in place), then prune complete checkpoints beyond the newest ``keep_last``. Main process only."""
    final = root / f"step-{step}"
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    write_marker(tmp)
    if final.exists():
        old = root / f".step-{step}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    complete = [p for _, p in list_checkpoints(root) if (p / COMPLETE).is_file()]
    for path in complete[:-keep_last]:
        shutil.rmtree(path)
    return final


def load_checkpoint(accelerator, path: Path, module, optimizer, extras: list = ()) -> dict:
    """Verify ``path``, restore model/optimizer/scaler/extras and this process' RNG in place (the arguments of
    :func:`save_checkpoint`) and return the trainer state. Every file loads, or a CheckpointError names it."""
    from safetensors.torch import load_model

    verify_checkpoint(path)
    state = read_state(path)
    with loading(path, path / MODEL_FILE):
        load_model(accelerator.unwrap_model(module), path / MODEL_FILE, device="cpu")
    optimizer_state = load_tensors(path, path / OPTIMIZER_FILE)
    with loading(path, path / OPTIMIZER_FILE):
        optimizer.load_state_dict(optimizer_state)
    if accelerator.scaler is not None:
        scaler_state = load_tensors(path, path / SCALER_FILE)
        with loading(path, path / SCALER_FILE):
            accelerator.scaler.load_state_dict(scaler_state)
    for i, extra in enumerate(extras):
        extra_state = load_tensors(path, path / EXTRA_FILE.format(i))
        with loading(path, path / EXTRA_FILE.format(i)):
            extra.load_state_dict(extra_state)
    rng = _read_rng_state(path, accelerator.process_index)
    with loading(path, path / RNG_FILE.format(accelerator.process_index)):
        set_rng_state(rng)
    return state
