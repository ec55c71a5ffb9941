"""End-to-end runs of the CLI on a small local corpus: training, exact resume after SIGKILL, export round trip,
data parallelism, and bad input that must fail clearly without touching existing runs."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distributed import torchrun
from helpers import toy_corpus, write_tiny_config

ROOT = Path(__file__).parent.parent
SCRIPT = str(ROOT / "scripts" / "pretrain.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = toy_corpus(n_docs=300, seed=1)
    (d / "a.txt").write_text("\n".join(docs[:150]) + "\n")
    (d / "b.txt").write_text("\n".join(docs[150:]) + "\n")
    return d


#: checkpoints every 2 steps, evaluation every 4
write_config = functools.partial(write_tiny_config, save_every=2, eval_every=4, eval_batches=2, keep_last=2)


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_losses(run: Path, key: str = "mlm_loss") -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps it redoes)."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            losses[rec["step"]] = rec[key]
    return losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("ref")
    cfg = write_config(d / "c.yaml", corpus, d / "cache")
    run_cli(cfg)
    return d / "run"


def test_run_writes_config_metrics_checkpoints_and_export(reference_run):
    run = reference_run
    assert (run / "config.yaml").is_file()
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 8 and evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[2])
    for key in ("step", "lr", "tokens", "tok_per_s", "grad_norm", "mlm_loss", "mlm_acc"):
        assert key in rec
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-6", "step-8"], "keep_last=2 keeps the two newest complete checkpoints"
    files = sorted(p.name for p in (run / "export").iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    config = json.loads((run / "export" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "bert"
    keys = load_file(str(run / "export" / "model.safetensors")).keys()
    assert not any(k.startswith("_orig_mod.") or k.startswith("module.") for k in keys)


def test_export_loads_in_fresh_process_with_equal_logits(reference_run):
    """The export of the final checkpoint, loaded by AutoModelForMaskedLM offline, reproduces its logits."""
    from transformers import AutoTokenizer

    from objectives import get_objective
    from pretrain.config import load_config
    from pretrain.hf_io import roundtrip_check

    cfg = load_config(reference_run / "config.yaml")
    tok = AutoTokenizer.from_pretrained(str(reference_run / "export"))
    obj = get_objective("mlm", tok)
    model = obj.build_model(cfg.model)
    weights = load_file(str(reference_run / "checkpoints" / "step-8" / "model.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}, strict=False)
    model.tie_weights()
    ids = tok(["the quick brown fox jumps over the lazy dog", "seven wizards box"], padding=True,
              return_tensors="pt")
    result = roundtrip_check(reference_run / "export", "AutoModelForMaskedLM", model, ids["input_ids"],
                             ids["attention_mask"])
    assert result["class"] == "BertForMaskedLM" and result["max_abs_err"] <= 1e-5
    assert result["fast"] and result["tokenizer"].startswith("BertTokenizer") and result["vocab"] == len(tok)


def test_sigkill_and_restart_gives_bit_identical_losses(reference_run, corpus, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(cfg)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-4" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 4 was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "export").exists(), "killed too late to test a resume"
    out = run_cli(cfg)
    assert "resumed from" in out.stdout
    ref, got = train_losses(reference_run), train_losses(run)
    assert got == ref, "per-step losses after resume differ from the uninterrupted run"
    a = load_file(str(reference_run / "checkpoints" / "step-8" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-8" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective, keys", [("mlm", ["mlm_loss"]), ("electra", ["gen_loss", "disc_loss"])])
def test_two_processes_equal_one_process_with_double_batch(reference_run, corpus, tmp_path, objective, keys):
    """2 gloo processes x B = 1 process x 2B: same per-step losses and updated parameters (dropout off: its masks
    depend on how the batch is split; ELECTRA's sampling noise does not, it is keyed by sample index)."""
    cfg2 = write_config(tmp_path / "two.yaml", corpus, reference_run.parent / "cache", micro_batch_size=2,
                        max_steps=4)
    (tmp_path / "one").mkdir()
    cfg1 = write_config(tmp_path / "one" / "one.yaml", corpus, reference_run.parent / "cache", max_steps=4)
    for cfg in (cfg1, cfg2):
        data = yaml.safe_load(cfg.read_text())
        data["model"].update(hidden_dropout=0.0, attention_dropout=0.0)
        data["objective"] = {"name": objective}
        cfg.write_text(yaml.safe_dump(data))
    torchrun(2, SCRIPT, str(cfg2))
    run_cli(cfg1)
    for key in keys:
        one, two = train_losses(tmp_path / "one" / "run", key), train_losses(tmp_path / "run", key)
        assert one.keys() == two.keys() == set(range(1, 5))
        for step in one:
            assert two[step] == pytest.approx(one[step], abs=1e-5), (key, step)
    a = load_file(str(tmp_path / "one" / "run" / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoints" / "step-4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    if objective == "electra":  # the AUC's histograms are summed over the processes like every count
        for run in (tmp_path / "one" / "run", tmp_path / "run"):
            evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                     if '"split": "eval"' in line]
            assert evals and all(0.0 < r["disc_auc"] < 1.0 for r in evals), evals


# ----------------------------------------------------------------------------------------------- bad input


def test_changed_config_is_refused_then_moved_aside_with_overwrite(reference_run, corpus, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache", max_steps=2)
    run_cli(cfg)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    changed = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache", max_steps=2, lr=5e-4)
    proc = run_cli(changed, check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr and "train.lr" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    run_cli(changed, "--overwrite")
    backups = list(tmp_path.glob("run.bak-*"))
    assert len(backups) == 1 and (backups[0] / "checkpoints" / "step-2" / "COMPLETE").exists()


@pytest.mark.parametrize("damage", ["truncate", "no_marker"])
def test_corrupt_latest_checkpoint_is_named_not_restarted(reference_run, corpus, tmp_path, damage):
    cfg = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache", max_steps=4)
    run_cli(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    if damage == "truncate":
        path = ckpt / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (ckpt / "COMPLETE").unlink()
    cfg2 = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache", max_steps=6)
    proc = run_cli(cfg2, check=False)
    assert proc.returncode == 2 and "step-4" in proc.stderr, proc.stderr[-2000:]
    assert ckpt.exists() and (tmp_path / "run" / "checkpoints" / "step-2").exists(), "nothing may be deleted"
    assert not (tmp_path / "run" / "checkpoints" / "step-6").exists(), "must not silently restart"


def test_missing_corpus_and_vocab_mismatch(reference_run, corpus, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", corpus, reference_run.parent / "cache")
    data = yaml.safe_load(cfg.read_text())
    data["data"]["files"] = [str(tmp_path / "nothing-*.txt")]
    cfg.write_text(yaml.safe_dump(data))
    proc = run_cli(cfg, check=False)
    assert proc.returncode == 2 and "nothing-*.txt" in proc.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    data["data"]["files"] = [str(empty)]
    data["output_dir"] = str(tmp_path / "run2")
    cfg.write_text(yaml.safe_dump(data))
    proc = run_cli(cfg, check=False)
    assert proc.returncode == 2 and "empty" in proc.stderr.lower()
    cfg = write_config(tmp_path / "c3.yaml", corpus, reference_run.parent / "cache")
    data = yaml.safe_load(cfg.read_text())
    data["model"]["vocab_size"] = 30522
    data["output_dir"] = str(tmp_path / "run3")
    cfg.write_text(yaml.safe_dump(data))
    proc = run_cli(cfg, check=False)
    assert proc.returncode == 2 and "vocab_size" in proc.stderr and "30522" in proc.stderr


def test_run_that_failed_before_its_first_step_accepts_the_fixed_config(corpus, tmp_path):
    data = yaml.safe_load(write_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", max_steps=2).read_text())
    data["model"]["vocab_size"] = 30522
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = run_cli(cfg, check=False)
    assert proc.returncode == 2 and "set model.vocab_size to null" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists(), "a run that never started saves no config"
    run_cli(cfg, "model.vocab_size=null")  # the fix the error names, without --overwrite
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "COMPLETE").exists()
    assert not list(tmp_path.glob("run.bak-*"))
    proc = run_cli(cfg, "model.vocab_size=null", "train.lr=5e-4", check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr, "a run with checkpoints keeps its config"


def test_moved_run_resumes(corpus, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", corpus, tmp_path / "cache", max_steps=2)
    run_cli(cfg)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    proc = run_cli(cfg, f"output_dir={moved}", "train.max_steps=4")
    assert "resumed from" in proc.stdout and (moved / "checkpoints" / "step-4" / "COMPLETE").exists()
    assert yaml.safe_load((moved / "config.yaml").read_text())["output_dir"] == str(moved)
