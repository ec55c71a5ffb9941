"""LR range test (smoothing, suggestions, early stop on divergence, CSV/PNG/JSON) and the one-cycle schedule
(shape, momentum, step-by-step equality with torch's OneCycleLR, config rules, the trainer setting beta1)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import toy_corpus, write_tiny_config
from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.lr_find import SmoothedLoss, auto_smoothing, exponential_lrs, suggest_lrs
from pretrain.schedules import apply_schedule, lr_at, lr_for, momentum_for, onecycle_at

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus_and_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("lrcorpus")
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=200, seed=3)) + "\n")
    return d / "corpus", d / "cache"


def test_script_imports_the_package_not_its_neighbour():
    """scripts/pretrain.py must not shadow the `pretrain` package when scripts/lr_find.py runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lr_find.py"), "--help"], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "--max-lr" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ LR range test


def test_exponential_lrs_and_bias_corrected_smoothing():
    lrs = exponential_lrs(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:])), "one decade per step here"
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        exponential_lrs(1.0, 1e-3, 10)
    s = SmoothedLoss(0.98)
    assert [s.update(5.0) for _ in range(4)] == pytest.approx([5.0] * 4), "bias correction: no pull towards 0"
    assert auto_smoothing(1e-7, 1.0, 100) == pytest.approx(1 - 4 / (99 / 7)), "EMA window = 1/4 decade"
    assert auto_smoothing(1e-7, 1.0, 10_000) == 0.98 and auto_smoothing(1e-5, 1e5, 20) == 0.6, "clipped"
    s = SmoothedLoss(0.5)
    assert s.update(2.0) == pytest.approx(2.0)
    assert s.update(4.0) == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)


def test_suggestions_on_a_known_curve():
    """loss(x) = 5 − 2·tanh(x − c) + quadratic blow-up after the minimum, x = log10 lr: steepest descent at x = c."""
    lrs = exponential_lrs(1e-6, 1.0, 121)
    c = -3.0
    losses = [5 - 2 * math.tanh(math.log10(lr) - c) + 40 * max(0.0, math.log10(lr) + 1.5) ** 2 for lr in lrs]
    s = suggest_lrs(lrs, losses)
    assert math.log10(s["steepest"]) == pytest.approx(c, abs=0.06)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert s["min_loss_lr"] == lrs[best] and s["min_over_10"] == pytest.approx(lrs[best] / 10)
    assert suggest_lrs(lrs[:2], losses[:2])["steepest"] is None, "no slope from two points"


def test_lr_find_stops_on_divergence_and_writes_csv_png(tmp_path, corpus_and_cache, capsys):
    from pretrain.lr_find import main

    corpus, cache = corpus_and_cache
    cfg = write_tiny_config(tmp_path / "c.yaml", corpus, cache)
    out = tmp_path / "lrf"
    args = [str(cfg), "train.micro_batch_size=8", "--min-lr", "1e-5", "--max-lr", "1e5", "--steps", "60",
            "--smoothing", "0.8", "--out", str(out)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "lr_find.json").read_text())
    assert summary["stop_reason"] in ("diverged", "non-finite"), summary
    with (out / "lr_find.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert 3 <= len(rows) < 60 and len(rows) == summary["steps_done"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-5)
    assert all(math.isfinite(float(r["smoothed_loss"])) for r in rows)
    assert 1e-5 <= summary["suggestion"] <= lrs[-1] and 1e-6 <= summary["min_over_10"] <= lrs[-1]
    png = (out / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert f"train.lr={summary['suggestion']:.2e}" in stdout
    assert not (tmp_path / "run").exists(), "the range test must not create or touch the run directory"


def test_lr_find_refuses_decoupled_runs(tmp_path):
    from pretrain.lr_find import lr_range_test

    cfg = load_config(None, ["data.files=[x.txt]", "decouple.mode=local", "decouple.chunks=2"])
    with pytest.raises(ValueError, match="decouple.mode=none"):
        lr_range_test(cfg, steps=5)


# ------------------------------------------------------------------------------------------------ one-cycle


@pytest.mark.parametrize("total,pct,div,final_div", [(100, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0),
                                                     (10, 0.5, 5.0, 2.0), (7, 0.3, 25.0, 1e4)])
def test_onecycle_equals_torch_onecyclelr(total, pct, div, final_div):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=total, pct_start=pct,
                                                anneal_strategy="cos", three_phase=False, div_factor=div,
                                                final_div_factor=final_div, base_momentum=0.85, max_momentum=0.95)
    for step in range(total):
        lr, beta1 = onecycle_at(step, lr=0.2, max_steps=total, pct_start=pct, div_factor=div,
                                final_div_factor=final_div)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        assert beta1 == pytest.approx(opt.param_groups[0]["betas"][0], rel=1e-12), step
        opt.step()
        sched.step()


def test_onecycle_shape_and_inverse_momentum():
    kw = dict(lr=1.0, max_steps=100, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    values = [onecycle_at(s, **kw) for s in range(100)]
    lrs, moms = [v[0] for v in values], [v[1] for v in values]
    peak = 29  # torch's phase boundary: pct_start · steps − 1
    assert lrs[0] == pytest.approx(1 / 25) and moms[0] == pytest.approx(0.95)
    assert lrs[peak] == pytest.approx(1.0) and moms[peak] == pytest.approx(0.85)
    assert lrs[-1] == pytest.approx(1 / 25 / 1e4) and moms[-1] == pytest.approx(0.95)
    assert max(lrs) == lrs[peak]
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), "rising to the peak"
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:])), "annealing after it"
    assert all(a > b for a, b in zip(moms[:peak], moms[1:peak + 1])), "momentum falls while the LR rises"
    assert all(a < b for a, b in zip(moms[peak:-1], moms[peak + 1:])), "and rises while it anneals"
    assert lr_at(42, schedule="onecycle", warmup_steps=100, min_lr_ratio=0.5, **kw) == lrs[42], \
        "warmup_steps and min_lr_ratio do not apply to one-cycle"


def test_onecycle_config_rules_and_apply_schedule():
    t = TrainConfig(schedule="onecycle", lr=0.01, max_steps=50, onecycle_pct_start=0.2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}], betas=(0.9, 0.98))
    for step in (0, 9, 30, 49):
        lr = apply_schedule(opt, t, step)
        assert lr == lr_for(t, step)
        for group in opt.param_groups:
            assert group["lr"] == lr and group["betas"] == (momentum_for(t, step), 0.98)
    t_lin = TrainConfig(schedule="linear")
    assert momentum_for(t_lin, 3) is None
    apply_schedule(opt, t_lin, 3)
    assert opt.param_groups[0]["betas"][0] == momentum_for(t, 49), "other schedules leave betas alone"

    cfg = load_config(None, ["data.files=[x.txt]", "train.schedule=onecycle", "train.onecycle_div_factor=10"])
    assert cfg.train.schedule == "onecycle" and cfg.train.onecycle_div_factor == 10.0
    bad = {"train.onecycle_pct_start=0": "onecycle_pct_start", "train.onecycle_pct_start=1.0": "onecycle_pct_start",
           "train.onecycle_div_factor=0.5": "onecycle_div_factor",
           "train.onecycle_final_div_factor=0": "onecycle_final_div_factor",
           "train.onecycle_base_momentum=0.99": "onecycle_base_momentum",
           "train.onecycle_max_momentum=1.0": "onecycle_max_momentum", "train.schedule=one_cycle": "onecycle"}
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["data.files=[x.txt]", override])


def test_trainer_sets_lr_and_beta1_per_step_under_onecycle(tmp_path, corpus_and_cache, monkeypatch):
    import pretrain.export
    from pretrain.trainer import fit

    corpus, cache = corpus_and_cache
    path = write_tiny_config(tmp_path / "c.yaml", corpus, cache, schedule="onecycle", max_steps=5, save_every=0,
                             lr=2e-3, onecycle_pct_start=0.4)
    # the export's fresh-process round trip is tested elsewhere; it would double this test's time
    monkeypatch.setattr(pretrain.export, "roundtrip_check", lambda *a, **k: {"class": "-", "max_abs_err": 0.0})
    fit(load_config(path))
    run = tmp_path / "run"
    t = load_config(run / "config.yaml").train
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    for step, lr in logged.items():  # the record of step s reports the LR its update used: that of step s - 1
        assert lr == pytest.approx(onecycle_at(step - 1, lr=2e-3, max_steps=5, pct_start=0.4)[0], rel=1e-12)
    state = torch.load(run / "checkpoints" / "step-5" / "optimizer.bin", weights_only=False)
    for group in state["param_groups"]:
        assert group["betas"][0] == pytest.approx(momentum_for(t, 4)) and group["betas"][1] == t.adam_beta2
