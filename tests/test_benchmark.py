"""scripts/benchmark.py step: runs both arms on CPU and their losses agree on identical weights (no timing claims)."""

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


def test_step_suite_runs_both_arms_with_equal_first_losses(benchmark, tmp_path, one_thread):
    out = tmp_path / "step.json"
    argv = ["step", "--objective", "mlm", "span", "electra", "--preset", "tiny", "--seq", "32", "--batch", "4", "--no-fast",
            "--steps", "2", "--repeat", "2", "--warmup", "1", "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert benchmark.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["objective"], r["arm"]) for r in rows] == [
        (o, a) for o in ("mlm", "span", "electra") for a in ("baseline", "ours")]
    for base, ours in zip(rows[::2], rows[1::2]):
        for row in (base, ours):
            assert row["device"] == "cpu" and row["precision"] == "fp32" and row["mfu"] is None
            assert row["tok_per_s"] > 0 and len(row["step_ms_rounds"]) == 2
            assert math.isclose(row["tok_per_s"], 4 * 32 / (row["step_ms"] / 1000), rel_tol=1e-9)
        assert base["ratio"] == 1.0 and math.isclose(ours["ratio"], ours["tok_per_s"] / base["tok_per_s"])
        # same initial weights, same batch, no dropout: the stock full-vocabulary loss equals our sparse head's
        assert abs(base["first_mlm_loss"] - ours["first_mlm_loss"]) < 1e-5, (base, ours)
