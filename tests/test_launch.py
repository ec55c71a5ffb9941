"""Launching on CPU: N torchrun processes train ONE data-parallel run (gloo), a launch that asked for N processes
but started one is refused, and the start banner names processes, device, precision, global batch and steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port, torchrun
from helpers import toy_corpus, write_tiny_config

ROOT = Path(__file__).parent.parent
SCRIPT = str(ROOT / "scripts" / "pretrain.py")
#: no GPU even where there is one: the CPU launch path under the default train.device (auto)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(toy_corpus(n_docs=200, seed=3)) + "\n")
    return d


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(cfg, *args):
    proc = subprocess.run([sys.executable, SCRIPT, str(cfg), *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def without_dropout(cfg: Path) -> Path:
    import yaml

    tree = yaml.safe_load(cfg.read_text())
    tree["model"].update(hidden_dropout=0.0, attention_dropout=0.0)
    cfg.write_text(yaml.safe_dump(tree))
    return cfg


def test_torchrun_on_cpu_trains_one_data_parallel_run(corpus, tmp_path):
    """2 processes x 1 micro-batch and 1 process x 2 accumulated see the same blocks and masks: without dropout they
    take the same steps, and evaluate the same fixed validation set (one block here: the second process holds no
    share of it and still takes part in the reduction)."""
    (tmp_path / "one").mkdir()
    common = dict(device="auto", max_steps=3, micro_batch_size=1, eval_batches=1)
    cfg2 = without_dropout(write_tiny_config(tmp_path / "two.yaml", corpus, tmp_path / "cache", **common))
    cfg1 = without_dropout(write_tiny_config(tmp_path / "one" / "one.yaml", corpus, tmp_path / "cache",
                                             grad_accum=2, **common))
    two = torchrun(2, SCRIPT, str(cfg2), env={"CUDA_VISIBLE_DEVICES": ""})
    one = run_cli(cfg1)
    run2, run1 = records(tmp_path / "run"), records(tmp_path / "one" / "run")
    train2 = [r for r in run2 if r["split"] == "train"]
    train1 = [r for r in run1 if r["split"] == "train"]
    assert [r["step"] for r in train2] == [1, 2, 3], "one record per step, not one per process"
    start = [r for r in run2 if r["split"] == "run"]
    assert len(start) == 1 and start[0]["world_size"] == 2
    assert [r["tokens"] for r in train2] == [r["tokens"] for r in train1]
    assert [r["loss"] for r in train2] == pytest.approx([r["loss"] for r in train1], rel=1e-5)
    (eval2,), (eval1,) = [r for r in run2 if r["split"] == "eval"], [r for r in run1 if r["split"] == "eval"]
    assert eval2["n_masked"] == eval1["n_masked"] > 0
    assert eval2["mlm_loss"] == pytest.approx(eval1["mlm_loss"], rel=1e-5)
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    banners = [line for line in two.stdout.splitlines() if line.startswith("training: ")]
    assert banners == ["training: 2 process(es) (2 data-parallel), device cpu, precision fp32, global batch 2 "
                       "blocks = 64 tokens per step (2 x 1 accumulated x 1), 3 steps"]
    assert one.stdout.count("training: 1 process(es) (1 data-parallel), device cpu") == 1


@pytest.mark.parametrize("flags", [["--cpu"], []], ids=["cpu", "no-gpu"])
def test_accelerate_launch_that_starts_one_process_is_refused(corpus, tmp_path, flags):
    """On CPU, accelerate launch --num_processes 2 (with or without --cpu) runs its single-process launcher."""
    cfg = write_tiny_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", device="auto")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *flags,
                           "--main_process_port", str(free_port()), SCRIPT, str(cfg)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0  # accelerate exits 1 on its child's 2
    assert "error: accelerate launch --num_processes N started one process, not N" in proc.stderr
    assert "torchrun --nproc_per_node N" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
