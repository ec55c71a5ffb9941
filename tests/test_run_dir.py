"""The run directory's guards: exports readable as the umask allows, one run per output_dir at a time (a lock,
stale ones taken over), and metrics.jsonl / TensorBoard cut back to the resumed step."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import make_tokenizer, tiny_model_config, toy_corpus, write_tiny_config

SCRIPT = str(Path(__file__).parent.parent / "scripts" / "pretrain.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root):
    """{relative path: permission bits} of ``root`` and everything under it."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in paths}


@pytest.mark.parametrize("name", ["mlm", "span", "electra"])
def test_export_has_the_umask_permissions(tmp_path, umask_022, name):
    from objectives import get_objective

    tok = make_tokenizer()
    objective = get_objective(name, tok, seed=0)
    objective.export(objective.build_model(tiny_model_config(vocab_size=len(tok))), tmp_path / "export", tok)
    got = modes(tmp_path / "export")
    assert "model.safetensors" in got or "discriminator/model.safetensors" in got
    dirs = {p for p in got if (tmp_path / "export" / p).is_dir()}
    assert {p: m for p, m in got.items() if p in dirs} == {p: 0o755 for p in dirs}
    assert {p: m for p, m in got.items() if p not in dirs} == {p: 0o644 for p in got if p not in dirs}


# ---------------------------------------------------------------------------------------------- the lock


def write_lock(run, pid: int):
    from pretrain.rundir import lock_path

    lock_path(run).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01 00:00"}))


@pytest.fixture
def live_pid():
    """The pid of a live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_live_holder_refuses_other_launches_but_not_its_own_processes(tmp_path, live_pid):
    from pretrain.rundir import RunDirLocked, lock_path, run_dir_lock

    write_lock(tmp_path / "run", live_pid)
    with pytest.raises(RunDirLocked, match=f"in use by pid {live_pid} on {socket.gethostname()} since 2026-01-01"):
        with run_dir_lock(tmp_path / "run", is_main=True):
            pass
    with run_dir_lock(tmp_path / "run", is_main=False):  # another process of the holder's launch
        pass
    assert json.loads(lock_path(tmp_path / "run").read_text())["pid"] == live_pid, "the holder's lock is kept"


def test_lock_is_released_on_an_exception(tmp_path):
    from pretrain.rundir import lock_path, run_dir_lock

    with pytest.raises(KeyError):
        with run_dir_lock(tmp_path / "run", is_main=True):
            assert json.loads(lock_path(tmp_path / "run").read_text())["pid"] == os.getpid()
            raise KeyError("boom")
    assert not lock_path(tmp_path / "run").exists()


def run_cli(cfg, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, str(cfg)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture
def run_config(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(toy_corpus(n_docs=200, seed=5)) + "\n")
    cfg = write_tiny_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", max_steps=4, save_every=2,
                            keep_last=10)
    data = yaml.safe_load(cfg.read_text())
    data["log"]["tensorboard"] = True
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_cli_refuses_a_locked_output_dir_and_writes_nothing(run_config, live_pid):
    write_lock(run_config.parent / "run", live_pid)
    proc = run_cli(run_config, check=False)
    assert proc.returncode == 2 and f"in use by pid {live_pid}" in proc.stderr
    assert not (run_config.parent / "run").exists()


def tensorboard_steps(run, tag="train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_stale_lock_is_taken_over_and_a_finished_run_leaves_none(run_config, tmp_path):
    from pretrain.rundir import lock_path

    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(run, dead.pid)
    out = run_cli(run_config)
    assert f"taking over the stale lock {lock_path(run)} of pid {dead.pid}" in out.stdout
    assert (run / "export" / "model.safetensors").is_file()
    assert not lock_path(run).exists(), "a finished run leaves no lock behind"


def test_resume_cuts_the_logs_back_to_the_checkpoint(run_config, tmp_path):
    """A run that logged past its newest complete checkpoint (step-4 removed: the newest is step-2) resumes there
    and ends with one record per step, in order, in metrics.jsonl and TensorBoard."""
    run = tmp_path / "run"
    run_cli(run_config)
    shutil.rmtree(run / "checkpoints" / "step-4")
    out = run_cli(run_config)
    assert "resumed from" in out.stdout and "(step 2)" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["event"] for r in records if r["split"] == "run"] == ["start", "resume"]
    assert tensorboard_steps(run) == [1, 2, 3, 4]


def test_a_killed_unreaped_holder_counts_as_gone(tmp_path):
    from pretrain.rundir import lock_path, run_dir_lock

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.02)
    write_lock(tmp_path / "run", zombie.pid)
    with run_dir_lock(tmp_path / "run", is_main=True):
        assert json.loads(lock_path(tmp_path / "run").read_text())["pid"] == os.getpid()
    zombie.wait()


def test_a_stale_lock_replaced_meanwhile_is_not_removed(tmp_path, live_pid):
    """Two runs restarted at once both judged the old lock stale: the slower one must not delete the new lock."""
    from pretrain.rundir import lock_path, remove_stale

    write_lock(tmp_path / "run", live_pid)  # the faster run's new lock
    stale = {"pid": 999999, "host": socket.gethostname(), "since": "2026-01-01 00:00"}
    remove_stale(lock_path(tmp_path / "run"), stale)
    assert json.loads(lock_path(tmp_path / "run").read_text())["pid"] == live_pid
    remove_stale(lock_path(tmp_path / "run"), json.loads(lock_path(tmp_path / "run").read_text()))
    assert not lock_path(tmp_path / "run").exists()
