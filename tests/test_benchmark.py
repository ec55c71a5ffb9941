"""scripts/benchmark.py (pretrain/bench): every suite runs on CPU and its rows are consistent (no timing claims); the step suite's arms
agree on their first loss from identical weights."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_suite_runs_every_arm_with_equal_first_losses(benchmark, tmp_path, one_thread):
    out = tmp_path / "step.json"
    argv = ["step", "--objective", "mlm", "span", "electra", "--preset", "tiny", "--seq", "32", "--batch", "4",
            "--ours", "eager", "fused", "--steps", "2", "--repeat", "2", "--warmup", "1", "--threads", "1",
            "--device", "cpu", "--out", str(out)]
    assert benchmark.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["objective"], r["arm"], r["variant"]) for r in rows] == [
        (o, *a) for o in ("mlm", "span", "electra") for a in (("baseline", None), ("ours", "eager"), ("ours", "fused"))]
    for base, *ours in zip(rows[::3], rows[1::3], rows[2::3]):
        for row in (base, *ours):
            assert row["device"] == "cpu" and row["precision"] == "fp32" and row["mfu"] is None
            assert row["peak_mem_mb"] is None and row["peak_mem_ratio"] is None
            assert row["tok_per_s"] > 0 and len(row["step_ms_rounds"]) == 2
            assert math.isclose(row["tok_per_s"], 4 * 32 / (row["step_ms"] / 1000), rel_tol=1e-9)
            assert math.isclose(row["ratio"], row["tok_per_s"] / base["tok_per_s"])
            # same initial weights, same batch, no dropout: the stock full-vocabulary loss equals our sparse heads'
            assert abs(base["first_mlm_loss"] - row["first_mlm_loss"]) < 1e-5, (base, row)
            assert math.isclose(row["first_loss_rel_diff"],
                                abs(base["first_mlm_loss"] - row["first_mlm_loss"]) / base["first_mlm_loss"])
        assert base["ratio"] == 1.0


def test_state_bytes_counts_parameters_and_optimizer_state_once():
    import torch

    from pretrain.bench.step import state_bytes

    layer = torch.nn.Linear(4, 3)  # 15 parameters
    optimizer = torch.optim.AdamW(layer.parameters())
    assert state_bytes([*layer.parameters(), layer.weight], optimizer) == 15 * 4
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # exp_avg and exp_avg_sq per parameter (fp32) and a scalar step count each
    steps = sum(st["step"].numel() * st["step"].element_size() for st in optimizer.state.values())
    assert state_bytes(layer.parameters(), optimizer) == 3 * 15 * 4 + steps


def test_e2e_suite_runs_the_trainer_and_its_pure_step(benchmark, tmp_path, one_thread):
    out = tmp_path / "e2e.json"
    argv = ["e2e", "--objective", "mlm", "--preset", "tiny", "--seq", "32", "--batch", "2", "--steps", "2",
            "--repeat", "1", "--documents", "60", "--workers", "0", "--threads", "1", "--device", "cpu",
            "--no-fast", "--out", str(out)]
    assert benchmark.main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert row["suite"] == "e2e" and row["objective"] == "mlm" and row["device"] == "cpu"
    assert row["e2e_tok_per_s"] > 0 and row["pure_step_tok_per_s"] > 0
    assert math.isclose(row["ratio"], row["e2e_tok_per_s"] / row["pure_step_tok_per_s"])
    assert 0.0 <= row["e2e_data_wait"] <= 1.0


def test_decouple_suite_runs_the_baselines_and_two_process_pipelines(benchmark, tmp_path):
    """Real torchrun workers (gloo, free port): backprop with 1 and 2 threads, local and synthetic K=2."""
    out = tmp_path / "decouple.json"
    argv = ["decouple", "--chunks", "2", "--synthetic", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--vocab", "300", "--seq", "16", "--batch", "4", "--steps", "3", "--warmup", "2", "--repeat", "1",
            "--out", str(out)]
    assert benchmark.main(argv) == 0
    rows = json.loads(out.read_text())
    summary = {r["config"]: r for r in rows if r.get("summary")}
    assert sorted(summary) == ["backprop-1proc-1thread", "backprop-1proc-2threads", "local-K2-2proc-1thread",
                               "synthetic-S1-K2-2proc-1thread"]
    base = summary["backprop-1proc-1thread"]["tok_per_s"]
    for name, row in summary.items():
        assert row["tok_per_s"] > 0 and row["runs"] == 1 and row["fast"] is False  # model.fast: CUDA only
        assert math.isclose(row["tok_per_s"], 3 * 4 * 16 / (row["step_ms"] * 3 / 1000), rel_tol=1e-9)
        assert math.isclose(row["ratio"], row["tok_per_s"] / base), name
    assert summary["local-K2-2proc-1thread"]["processes"] == 2
