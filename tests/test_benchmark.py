"""scripts/benchmark.py (pretrain/bench): every suite runs on CPU and its rows are consistent (no timing claims); the step suite's arms
agree on their first loss from identical weights."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
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


#: the stock class each arch's baseline trains (model.arch -> *ForMaskedLM)
STOCK = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "modernbert": "ModernBertForMaskedLM"}


@pytest.mark.parametrize("arch", list(STOCK))
def test_step_suite_baseline_is_the_stock_masked_lm_of_the_arch(benchmark, tmp_path, one_thread, arch):
    """--arch: the baseline is that arch's stock *ForMaskedLM(labels=...), ours the trainer's step on the same model;
    both first losses finite and equal (same weights, eval mode), the ratio the baseline's step time over ours."""
    out = tmp_path / "step.json"
    argv = ["step", "--arch", arch, "--objective", "mlm", "span", "--preset", "tiny", "--seq", "32", "--batch", "4",
            "--ours", "eager", "--steps", "2", "--repeat", "1", "--warmup", "1", "--threads", "1", "--device", "cpu",
            "--out", str(out)]
    assert benchmark.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["arch"], r["objective"], r["arm"]) for r in rows] == [
        (arch, o, a) for o in ("mlm", "span") for a in ("baseline", "ours")]
    for base, ours in zip(rows[::2], rows[1::2]):
        assert base["what"].startswith(f"stock {STOCK[arch]}(labels=...) (full-vocabulary logits)")
        assert math.isfinite(base["first_mlm_loss"]) and math.isfinite(ours["first_mlm_loss"])
        assert base["first_mlm_loss"] == pytest.approx(ours["first_mlm_loss"], abs=1e-5)
        assert ours["ratio"] == pytest.approx(base["step_ms"] / ours["step_ms"]) and base["ratio"] == 1.0


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


def test_quality_suite_trains_every_arm_and_reports_curves(benchmark, tmp_path, capsys):
    """Real runs (2-process arms by torchrun) of a 2 x 32 model: curves, G at equal tokens and wall time, PNG."""
    from helpers import toy_corpus, write_tiny_config

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=150, seed=4)) + "\n")
    cfg = write_tiny_config(tmp_path / "base.yaml", tmp_path / "corpus", tmp_path / "cache")
    out = tmp_path / "quality.json"
    argv = ["quality", "--config", str(cfg), "--shapes", "h128-L4", "--seeds", "0", "--steps", "4", "--arms",
            "backprop-2threads", "backprop-1thread", "local-K2", "local-K2-then-backprop", "frozen-lower-K2",
            "--eval-every", "2", "--eval-batches", "1", "--batch", "4", "--out-runs", str(tmp_path / "runs"),
            "--out", str(out), "--override", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
            "model.intermediate_size=64", "train.device=cpu"]
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    curves, summary = result["shapes"]["h128-L4"]["curves"], result["shapes"]["h128-L4"]["summary"]
    assert set(curves) == {"backprop-2threads", "backprop-1thread", "local-K2", "local-K2-then-backprop",
                           "frozen-lower-K2"}
    for arm, c in curves.items():
        assert c["step"] == [2, 4], (arm, c["step"])
        assert c["tokens"] == [s * 4 * 32 for s in c["step"]] and all(np.diff(c["wall_s"]) > 0)
    assert set(curves["local-K2"]["chunks"][-1]) == {"chunk0_mlm_loss", "chunk1_mlm_loss"}
    # switched after step 3 of 4: chunk losses at the evaluation of step 2 only
    assert [set(c) for c in curves["local-K2-then-backprop"]["chunks"]] == [{"chunk0_mlm_loss", "chunk1_mlm_loss"},
                                                                             set()]
    assert all(g == 1.0 for g in summary["backprop-2threads"]["G_tokens"].values())
    assert all(g == 0.0 for g in summary["frozen-lower-K2"]["G_tokens"].values())
    assert result["shapes"]["h128-L4"]["seeds"]["0"] == {"curves": curves, "summary": summary}  # one seed: the mean
    assert summary["backprop-2threads"]["time_to_backprop_final_s"] == pytest.approx(curves["backprop-2threads"]
                                                                                     ["wall_s"][-1])
    assert benchmark.main(argv) == 0, "a second call reads the finished runs"
    metrics = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("metrics.jsonl")}
    other = [*argv[:argv.index("--arms") + 1], "local-K2", *argv[argv.index("--eval-every"):], "train.lr=3e-3"]
    assert benchmark.main(other) == 2, "a run of another protocol is refused, not read as this one"
    err = capsys.readouterr().err
    assert "local-K2-seed0 holds a run of another protocol" in err and "train.lr: 0.001 -> 0.003" in err, err
    assert "--out-runs" in err and {p: p.read_bytes() for p in metrics} == metrics


@pytest.mark.parametrize("shape", ["h128-L4", "h256-L8"])
def test_every_quality_arm_is_a_valid_run_config(shape, tmp_path):
    """Each arm's overrides (formatted as the suite does) make a config that validates, with the arm's processes."""
    import argparse

    from pretrain.bench.quality import ARMS, arm_overrides
    from pretrain.config import load_config

    args = argparse.Namespace(out_runs=tmp_path, steps=2000, eval_every=100, eval_batches=16, batch=32,
                              switch_at=0.75, override=[])
    for arm, (processes, _, _) in ARMS.items():
        cfg = load_config(ROOT / "configs" / "tiny.yaml", arm_overrides(args, shape, arm, 1))
        assert cfg.train.seed == 1 and cfg.train.max_steps == 2000 and cfg.output_dir == str(tmp_path / shape /
                                                                                               f"{arm}-seed1")
        assert (cfg.decouple.mode == "none") == (processes == 1) and cfg.decouple.chunks in (1, processes)
        assert cfg.decouple.until_step == (1500 if arm.endswith("then-backprop") else None)
        assert cfg.train.micro_batch_size * cfg.train.grad_accum == 32, arm  # the same global batch for every arm
    layerhead = load_config(ROOT / "configs" / "tiny.yaml", arm_overrides(args, shape, "local-K2-layerhead", 0))
    assert layerhead.decouple.aux_head == "layer"


def test_quality_curves_charge_no_evaluation_time_to_training(tmp_path):
    from pretrain.bench.quality import curve, gap_closed, time_to_reach

    lines = [{"split": "run", "event": "start", "step": 0, "time": 100.0},
             {"split": "train", "step": 2, "tokens": 8, "time": 110.0},
             {"split": "eval", "step": 2, "mlm_loss": 6.0, "mlm_acc": 0.1, "time": 115.0},
             {"split": "train", "step": 4, "tokens": 16, "time": 125.0},
             {"split": "eval", "step": 4, "mlm_loss": 5.0, "mlm_acc": 0.2, "chunk0_mlm_loss": 6.5, "time": 126.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    c = curve(tmp_path)
    assert c["wall_s"] == [10.0, 20.0] and c["chunks"] == [{}, {"chunk0_mlm_loss": 6.5}]
    assert time_to_reach(c, 5.5) == pytest.approx(15.0) and time_to_reach(c, 4.0) is None
    assert gap_closed([5.0, 6.0], [6.0, 6.0], [4.0, 6.0]) == [0.5, None]


def test_quality_curve_of_a_resumed_arm_continues_its_wall_clock(tmp_path):
    """Killed after step 4 was logged but before its checkpoint; resumed from step 2's checkpoint: step 4 is the
    resumed process's, and the wall clock goes on from step 2's (the time between the two processes is not counted)."""
    from pretrain.bench.quality import curve

    lines = [{"split": "run", "event": "start", "step": 0, "time": 100.0},
             {"split": "train", "step": 2, "tokens": 8, "time": 110.0},
             {"split": "eval", "step": 2, "mlm_loss": 6.0, "mlm_acc": 0.1, "time": 115.0},
             {"split": "train", "step": 4, "tokens": 16, "time": 125.0},
             {"split": "eval", "step": 4, "mlm_loss": 9.9, "mlm_acc": 0.0, "time": 126.0},
             {"split": "run", "event": "resume", "step": 2, "time": 500.0},
             {"split": "train", "step": 4, "tokens": 16, "time": 512.0},
             {"split": "eval", "step": 4, "mlm_loss": 5.0, "mlm_acc": 0.2, "probe_acc_layer2": 0.4, "time": 514.0},
             {"split": "train", "step": 6, "tokens": 24, "time": 520.0},
             {"split": "eval", "step": 6, "mlm_loss": 4.5, "mlm_acc": 0.3, "time": 521.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    c = curve(tmp_path)
    assert c["step"] == [2, 4, 6] and c["loss"] == [6.0, 5.0, 4.5]
    assert c["wall_s"] == [10.0, 22.0, 28.0]  # 10 + 12; then 10 + 20 - 2 s of evaluation
    assert c["probes"] == [{}, {"probe_acc_layer2": 0.4}, {}]


def test_data_suite_runs_both_ways_on_the_same_tokens(benchmark, tmp_path):
    """Real arms (fresh processes, 1 and 2 processes each way) on a 0.4 MiB corpus (> 1000 documents: several map
    batches): every arm tokenizes the documents this tokenizer gives, ours packs exactly floor((T + D) / (L - 2))
    blocks and the HF way its T + 2D tokens less under a block per map batch; the cached calls hit."""
    from helpers import toy_corpus, write_tiny_config
    from transformers import AutoTokenizer

    from pretrain.bench.data import write_corpus

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=300, seed=5)) + "\n")
    cfg = write_tiny_config(tmp_path / "base.yaml", tmp_path / "corpus", tmp_path / "cache")
    out, work = tmp_path / "data.json", tmp_path / "work"
    argv = ["data", "--config", str(cfg), "--sizes-mb", "0.4", "--num-proc", "2", "--repeat", "1", "--work",
            str(work), "--out", str(out)]
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["arm"] for r in runs] == ["hf-1proc", "ours-1proc", "hf-2proc", "ours-2proc"]
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    written = write_corpus(toy_corpus(n_docs=300, seed=5), tmp_path / "expected.txt", int(0.4 * 2 ** 20))
    lines = (tmp_path / "expected.txt").read_text().splitlines()
    n_docs, block = len(lines), 32
    n_tokens = sum(len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"])
    assert n_docs > 1000
    for r in runs:
        assert r["corpus_bytes"] == written and (r["corpus_tokens"], r["documents"]) == (n_tokens, n_docs), r
        assert r["cache_hit"] and r["peak_pss_anon_mb"] > 10 and r["seconds"] > 0 and r["cached_s"] > 0
        assert math.isclose(r["tok_per_s"], n_tokens / r["seconds"])
        assert math.isclose(r["disk_bytes_per_token"], r["disk_bytes"] / n_tokens)
        assert r["block_tokens"] == r["blocks"] * block
        if r["way"] == "ours":  # uint16 ids + int16 word ids per block token, beside the Arrow text
            assert r["blocks"] == (n_tokens + n_docs) // (block - 2) and r["disk_bytes"] > 4 * r["block_tokens"]
        else:  # [CLS] doc [SEP] concatenated; each map batch (<= 1000 documents of a process's shard) drops < a block
            batches = n_docs // 1000 + r["num_proc"]
            assert n_tokens + 2 * n_docs - batches * block < r["block_tokens"] <= n_tokens + 2 * n_docs, r
    assert [(s["arm"], s["runs"]) for s in result["summary"]] == [(r["arm"], 1) for r in runs]
    assert out.with_suffix(".md").read_text().splitlines()[2].startswith("| 0.4 MB | ")
    assert not list(work.glob("cache-*")), "the arms' caches are removed"


def test_data_summary_takes_medians_and_ratios_to_hf_at_the_same_num_proc():
    from pretrain.bench.data import MEDIANS, summarise, table

    def run(size, arm, k):
        way, procs = arm.split("-")
        return {"size_mb": size, "arm": arm, "way": way, "num_proc": int(procs[0]), "corpus_tokens": 1000 * size,
                "cache_hit": k != 2 or arm != "hf-2proc", **{m: (size + k) * (2 if way == "ours" else 1) + i
                                                               for i, m in enumerate(MEDIANS)}}

    arms = ("hf-1proc", "ours-1proc", "hf-2proc", "ours-2proc")
    runs = [run(size, arm, k) for size in (8, 32) for k in (2, 0, 1) for arm in arms]
    summary = summarise(runs)
    assert [(s["size_mb"], s["arm"], s["runs"]) for s in summary] == [(size, arm, 3) for size in (8, 32)
                                                                      for arm in arms]
    for s in summary:
        ours = s["way"] == "ours"
        assert all(s[m] == (s["size_mb"] + 1) * (2 if ours else 1) + i for i, m in enumerate(MEDIANS))  # k = 1
        assert s["cache_hit"] == (s["arm"] != "hf-2proc")
        if ours:
            assert s["ratio_vs_hf"] == {m: (2 * (s["size_mb"] + 1) + i) / (s["size_mb"] + 1 + i)
                                        for i, m in enumerate(MEDIANS)}
        else:
            assert "ratio_vs_hf" not in s
    lines = table(summary).splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[3] == "| 8 MB | 0.01M | ours-1proc | 18.0 | 0k | 1.90 | 20 | 1.82 | 21.0 | 1.75 | 22.00 | 1.69 |"
    assert lines[4].endswith("| 13.00 (miss) |  |")  # hf-2proc: one of its cached calls missed
