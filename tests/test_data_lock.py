"""Preparation runs once per shared cache: processes that want the same entry at once (a launch's ranks, or nodes
sharing a cache folder) wait on its lock and then read it; a killed builder's lock does not outlive it, and a
half-written entry is never read."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distributed import torchrun
from helpers import toy_corpus, write_tiny_config

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def tiny(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=400, seed=7)) + "\n")
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "corpus", tmp_path / "cache")
    text = cfg.read_text().replace("num_workers: 0", "num_workers: 0\n  num_proc: 1")
    cfg.write_text(text)
    return cfg


def test_three_processes_preparing_one_cache_build_it_once(tmp_path):
    cfg = tiny(tmp_path)
    (tmp_path / "out").mkdir()
    torchrun(3, str(ROOT / "tests" / "dist" / "prepare_worker.py"), str(cfg), str(tmp_path / "out"))
    results = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(3)]
    assert sum(r["train_wordpiece"] for r in results) == 1, results
    assert sum(r["_build"] for r in results) == 1, results
    assert len({r["digest"] for r in results}) == 1
    assert not list((tmp_path / "cache" / "blocks").glob(".*.tmp-*")), "no temporary directory left behind"


HOLD = """
import sys, time
from pathlib import Path
from pretrain.data.lock import build_lock
with build_lock(Path(sys.argv[1]), "blocks"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_builders_lock_is_released_and_its_leftovers_ignored(tmp_path):
    """A builder killed while holding the blocks' lock (and leaving a half-written temporary directory) makes the
    next run wait only as long as it lives; the run then builds the entry itself."""
    from pretrain.config import load_config
    from pretrain.data import prepare_blocks

    cfg = tiny(tmp_path)
    prepare_blocks(load_config(cfg))  # to learn the entry's path
    entry = next(p for p in (tmp_path / "cache" / "blocks").iterdir() if p.is_dir() and not p.name.startswith("."))
    for f in entry.iterdir():
        f.unlink()
    entry.rmdir()
    half = entry.parent / f".{entry.name}.tmp-1-deadbeef"
    half.mkdir()
    (half / "train_input_ids.npy").write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(entry)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "holding"
    waiter = subprocess.Popen([sys.executable, "-c", "import sys; from pretrain.config import load_config; "
                               "from pretrain.data import prepare_blocks; "
                               "d = prepare_blocks(load_config(sys.argv[1])); print('blocks', len(d.train))",
                               str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in waiter.stderr:  # until it reports waiting (it reaches the lock after its imports and the tokenizer)
        seen.append(line)
        if "another process is preparing" in line:
            break
    time.sleep(1)
    assert waiter.poll() is None, "the waiter must wait while the holder lives: " + "".join(seen)[-2000:]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err[-3000:]
    assert any("another process is preparing" in line for line in seen) and int(out.split()[-1]) > 0
    assert (entry / "meta.json").is_file() and not half.exists(), "the killed builder's leftovers are removed"
