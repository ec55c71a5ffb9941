"""Plots of metrics.jsonl: last record per step after a resume, panels, legends, PNG output for step/tokens axes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plots import main, panels, plot_runs, read_metrics, run_names

ROOT = Path(__file__).parent.parent


def write_run(run: Path, steps: int, resume_at: int | None = None, scale: float = 1.0, sbo: bool = False,
              objective: str = "mlm") -> Path:
    """A metrics.jsonl like the trainer's: a run record, eval at 0 and every 10 steps, train every 2; a resumed run
    logs a second start and re-logs the steps after ``resume_at`` with other values; a half-written last line."""
    run.mkdir(parents=True)
    lines = [{"split": "run", "event": "start", "step": 0, "world_size": 1, "config": {"objective": {"name": objective}}}]

    def train(step, bump=0.0):
        rec = {"split": "train", "step": step, "lr": 1e-3 * min(1, step / 10), "tokens": 4096 * step,
               "tok_per_s": 1e4 + step, "grad_norm": 1.0, "mlm_loss": scale * (9 - step / 10) + bump,
               "mlm_acc": step / 100, "n_masked": 600.0, "loss": scale * (9 - step / 10) + bump, "mfu": None}
        if sbo:
            rec["sbo_loss"] = 8 - step / 20
        return rec

    for step in range(0, steps + 1, 2):
        if step % 10 == 0:
            lines.append({"split": "eval", "step": step, "mlm_loss": scale * (9 - step / 12), "mlm_acc": step / 120,
                          "n_masked": 900.0, **({"sbo_loss": 8 - step / 25} if sbo else {})})
        if step:
            lines.append(train(step, bump=5.0 if resume_at is not None and step > resume_at else 0.0))
    if resume_at is not None:  # the resumed process redoes the steps after its checkpoint
        lines.append({"split": "run", "event": "resume", "step": resume_at, "world_size": 1})
        lines += [train(step) for step in range(resume_at + 2, steps + 1, 2)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"split": "train", "step": 9'
    (run / "metrics.jsonl").write_text(text)
    return run


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "a" / "mlm", 30, resume_at=20),
            write_run(tmp_path / "b" / "span", 24, scale=1.1, sbo=True, objective="span")]


def test_read_metrics_keeps_the_last_record_per_step(runs):
    with pytest.warns(UserWarning, match="not JSON"):
        m = read_metrics(runs[0])
    steps = [r["step"] for r in m["train"]]
    assert steps == list(range(2, 31, 2)), "one record per step, sorted"
    assert all(r["mlm_loss"] == pytest.approx(9 - r["step"] / 10) for r in m["train"]), \
        "the resumed run's re-logged values replace the first attempt's"
    assert [r["step"] for r in m["eval"]] == [0, 10, 20, 30] and [r["event"] for r in m["run"]] == ["start", "resume"]


def test_panels_and_names(runs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = {title: (series, members) for title, series, members in panels([read_metrics(r) for r in runs])}
    assert list(grid) == ["loss (span)", "mlm_loss", "sbo_loss", "learning rate", "tokens / s", "eval mlm_acc"]
    assert grid["mlm_loss"] == ([("train", "mlm_loss"), ("eval", "mlm_loss")], [0, 1])
    assert grid["loss (span)"] == ([("train", "loss")], [1]), "MLM's total is its one part: no panel of its own"
    assert not any(k.startswith("n_") or "time" in k for k in grid)
    assert run_names(runs) == ["mlm", "span"]
    assert run_names([runs[0].parent.parent / "x" / "run", runs[0].parent.parent / "y" / "run"]) == ["x/run", "y/run"]


def test_totals_of_different_objectives_never_share_an_axis(runs, tmp_path):
    """SpanBERT's total (MLM + SBO) and ELECTRA's (generator + 50 x discriminator) are on scales of their own."""
    import warnings

    electra = write_run(tmp_path / "c" / "electra", 10, sbo=True, objective="electra")
    span2 = write_run(tmp_path / "d" / "span-seed1", 10, sbo=True, objective="span")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = {title: members for title, _, members in panels([read_metrics(r) for r in [*runs, electra, span2]])}
    assert grid["loss (span)"] == [1, 3] and grid["loss (electra)"] == [2] and "loss" not in grid


@pytest.mark.parametrize("x", ["step", "tokens"])
def test_plot_two_runs_writes_a_png(runs, tmp_path, x):
    out = tmp_path / "plots" / f"cmp-{x}.png"
    with pytest.warns(UserWarning):
        assert plot_runs(runs, out, x=x) == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli(runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    with pytest.warns(UserWarning):
        assert main([*map(str, runs), "--out", str(out), "--x", "tokens", "--names", "bert", "spanbert"]) == 0
    assert out.stat().st_size > 1000 and str(out) in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--x" in proc.stdout, proc.stderr[-2000:]
