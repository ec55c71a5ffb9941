"""Checkpoint files are never unpickled into objects, and a damaged file is reported with the way out, never
skipped: a planted pickle in any file read on resume is refused without running; random bytes in the RNG file or a
truncated model/optimizer file refuse the resume naming the file and the previous complete checkpoint; checkpoints
of the earlier format (accelerate's ``save_state``, marker ``ok`` without checksums) still resume exactly."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import Planted, train_records
from pretrain.checkpoint import COMPLETE, CheckpointError

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "dist"))
import decouple_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = {"none": ["decouple.mode=none", "decouple.chunks=1"], "local": [],
         "synthetic": ["decouple.mode=synthetic", "decouple.synthetic.staleness=1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode -> a finished 6-step run (checkpoints step-4 and step-6) on in-memory blocks, made on first use."""
    import pretrain.export

    saved, made = pretrain.export.roundtrip_check, {}
    pretrain.export.roundtrip_check = decouple_worker.skip_roundtrip

    def get(mode: str) -> Path:
        if mode not in made:
            made[mode] = tmp_path_factory.mktemp(mode) / "run"
            decouple_worker.main(str(made[mode]), MODES[mode])
        return made[mode]

    yield get
    pretrain.export.roundtrip_check = saved


def copy_run(run: Path, to: Path, keep_through: int = 6) -> Path:
    """A copy of ``run`` at ``to`` (config pointed there) without checkpoints after step ``keep_through``."""
    shutil.copytree(run, to)
    tree = yaml.safe_load((to / "config.yaml").read_text())
    tree["output_dir"] = str(to)
    (to / "config.yaml").write_text(yaml.safe_dump(tree))
    for path in (to / "checkpoints").glob("step-*"):
        if int(path.name[5:]) > keep_through:
            shutil.rmtree(path)
    if keep_through < 6:
        shutil.rmtree(to / "export")
    return to


def resume(run: Path, mode: str) -> None:
    import pretrain.export

    saved = pretrain.export.roundtrip_check
    pretrain.export.roundtrip_check = decouple_worker.skip_roundtrip
    try:
        decouple_worker.main(str(run), MODES[mode])
    finally:
        pretrain.export.roundtrip_check = saved


def to_earlier_format(step: Path) -> None:
    """Rewrite checkpoint ``step`` as accelerate's ``save_state`` wrote it before checksums: RNG in
    ``random_states_0.pkl`` (Python tuple, NumPy's state with an ndarray, torch's byte tensor), marker ``ok``."""
    rng = step / "rng_state_0.json"
    if rng.is_file():
        s = json.loads(rng.read_text())
        name, keys, pos, has_gauss, cached = s["numpy"]
        states = {"step": 0, "random_state": (s["python"][0], tuple(s["python"][1]), s["python"][2]),
                  "numpy_random_seed": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                  "torch_manual_seed": torch.tensor(s["torch"], dtype=torch.uint8)}
        torch.save(states, step / "random_states_0.pkl")
        rng.unlink()
    (step / COMPLETE).write_text("ok\n")


# ----------------------------------------------------------------------------------------------- no pickle


@pytest.mark.parametrize("mode, file", [("none", "optimizer.bin"), ("none", "random_states_0.pkl"),
                                        ("local", "chunk0/state.pt"), ("synthetic", "chunk0/synthetic_state.pt")])
def test_a_planted_pickle_is_refused_and_never_runs(runs, tmp_path, mode, file):
    run = copy_run(runs(mode), tmp_path / "run")
    step = run / "checkpoints" / "step-6"
    to_earlier_format(step)  # no checksums to catch the change: the loader alone must refuse the object
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Planted(marker)}, step / file)
    torch.load(step / file, weights_only=False)  # the planted file is live: loading it the old way runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=f"step-6 is damaged: {file} does not load as tensors and plain types"):
        resume(run, mode)
    assert not marker.exists(), "a checkpoint file ran code on resume"


# ----------------------------------------------------------------------------------------------- damage


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("earlier_format", [False, True], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("file, damage", [("rng", random_bytes), ("model.safetensors", truncate),
                                          ("optimizer.bin", truncate)], ids=["rng", "model", "optimizer"])
def test_a_damaged_file_refuses_the_resume_naming_it_and_the_previous_checkpoint(runs, tmp_path, file, damage,
                                                                                 earlier_format):
    run = copy_run(runs("none"), tmp_path / "run")
    step = run / "checkpoints" / "step-6"
    if earlier_format:
        to_earlier_format(step)
    if file == "rng":
        file = "random_states_0.pkl" if earlier_format else "rng_state_0.json"
    damage(step / file)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=f"step-6 is damaged: {file} .*; move it away to resume from step-4"):
        resume(run, "none")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("mode, file", [("none", "model.safetensors"), ("local", "chunk1/model.safetensors")])
def test_weights_overwritten_in_place_are_caught_by_their_checksum(runs, tmp_path, mode, file):
    """Same size, still a valid file: only the checksum written with it tells that the weights changed."""
    run = copy_run(runs(mode), tmp_path / "run")
    path = run / "checkpoints" / "step-6" / file
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"step-6 is damaged: {file} does not match the checksum.*step-4"):
        resume(run, mode)


def test_a_damaged_chunk_file_names_it_and_the_previous_checkpoint(runs, tmp_path):
    run = copy_run(runs("local"), tmp_path / "run")
    truncate(run / "checkpoints" / "step-6" / "chunk1" / "state.pt")
    with pytest.raises(CheckpointError, match="step-6 is damaged: chunk1/state.pt .*resume from step-4"):
        resume(run, "local")


# ----------------------------------------------------------------------------------------------- compatibility


def strip(record: dict) -> dict:
    """A train record without its timing fields."""
    return {k: v for k, v in record.items() if k not in ("time", "tok_per_s", "mfu", "data_wait")}


@pytest.mark.parametrize("mode", ["none", "local"])
def test_a_checkpoint_of_the_earlier_format_resumes_exactly(runs, tmp_path, mode):
    full = runs(mode)
    run = copy_run(full, tmp_path / "run", keep_through=4)
    to_earlier_format(run / "checkpoints" / "step-4")
    resume(run, mode)
    ref, got = train_records(full), train_records(run)
    for step in (5, 6):
        assert strip(got[step]) == strip(ref[step]), step
    for a_file in sorted((full / "checkpoints" / "step-6").rglob("*.safetensors")):
        b_file = run / a_file.relative_to(full)
        a, b = load_file(str(a_file)), load_file(str(b_file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), a_file
    assert json.loads((run / "checkpoints" / "step-6" / COMPLETE).read_text())["sha256"], "new checkpoints: checksums"
