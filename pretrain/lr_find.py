"""LR range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks", §3.3; Smith 2017/2018,
arXiv:1803.09820): train from the run's initialisation while the LR grows exponentially from ``min_lr`` to
``max_lr`` over N optimizer steps, and watch the loss.

The data, objective, model and optimizer are built exactly as :func:`pretrain.trainer.fit` builds them (same blocks,
same stream, same masking, same token-exact accumulation and clipping), so the curve describes the real run. The
loss is smoothed with an exponential moving average with bias correction (as in the fastai LR finder); the test
stops early once the smoothed loss exceeds ``diverge_factor`` × its best value, or the loss or gradient is not
finite.

An EMA lags by about β/(1−β) steps. fastai's β = 0.98 over 100 steps and 7 decades averages over ~3.5 decades of
LR, which pushes both suggestions up by a decade or more (measured on a toy corpus: steepest 5.5e-3 and min/10
5.2e-2, a LR where the raw loss already spikes, against 2.4e-3 / 2.4e-3 with β = 0.8). So by default β is set from
the sweep: the EMA spans a quarter decade, 1 − 1/(steps per decade / 4), clipped to [0.6, 0.98] (0.72 for the
default 100 steps over 1e-7..1); more steps allow more smoothing.

Suggested peak LR (``train.lr``), both on the smoothed curve up to its minimum:

* ``steepest``: the LR where the smoothed loss falls fastest per decade of LR (most negative d loss / d log10 lr);
  the loss is still improving quickly there and is far from diverging. This is the printed suggestion.
* ``min_over_10``: the LR of the minimum smoothed loss divided by 10 (the minimum is already at the edge of
  divergence). Usually the more conservative of the two; prefer it for long runs with a linear/cosine schedule.

For ``train.schedule=onecycle`` Smith takes the largest LR that still trains as the cycle's peak (towards
``min_loss_lr``): the cycle starts at peak/``onecycle_div_factor`` and its high momentum at low LR keeps it stable.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LRFindResult:
    lrs: list[float]
    """LR of each completed step."""
    losses: list[float]
    """Raw training loss of each step (token-exact over the step's window)."""
    smoothed: list[float]
    """Bias-corrected exponential moving average of ``losses``."""
    steepest: float | None
    """LR of the most negative slope of the smoothed loss vs log10(LR), before its minimum (None: too few points)."""
    min_over_10: float | None
    """LR of the minimum smoothed loss, divided by 10."""
    min_loss_lr: float | None
    """LR of the minimum smoothed loss."""
    stop_reason: str
    """``completed``, ``diverged`` (smoothed loss > factor × best) or ``non-finite``."""
    settings: dict = field(default_factory=dict)
    main_process: bool = True
    """False on the other processes of a multi-process launch (only the main one writes files)."""

    @property
    def suggestion(self) -> float | None:
        return self.steepest if self.steepest is not None else self.min_over_10


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """``steps`` LRs growing geometrically from ``min_lr`` to ``max_lr`` (both included)."""
    if steps < 2:
        raise ValueError(f"the LR range test needs at least 2 steps, got {steps}")
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


class SmoothedLoss:
    """Exponential moving average with bias correction: avg_t = β·avg_{t−1} + (1−β)·x_t, reported as
    avg_t / (1 − β^t), so the first values are not pulled towards 0."""

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smoothing beta must be in [0, 1), got {beta}")
        self.beta, self.avg, self.n = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1.0 - self.beta) * x
        return self.avg / (1.0 - self.beta ** self.n)


def suggest_lrs(lrs: list[float], smoothed: list[float]) -> dict[str, float | None]:
    """The two suggestions of the module docstring from a (possibly early-stopped) curve."""
    if not lrs:
        return {"steepest": None, "min_over_10": None, "min_loss_lr": None}
    best = int(np.argmin(smoothed))
    result: dict[str, float | None] = {"steepest": None, "min_over_10": lrs[best] / 10, "min_loss_lr": lrs[best]}
    if best >= 2:  # a slope needs a few points before the minimum
        slope = np.gradient(np.asarray(smoothed[: best + 1]), np.log10(np.asarray(lrs[: best + 1])))
        result["steepest"] = float(lrs[int(np.argmin(slope))])
    return result


def auto_smoothing(min_lr: float, max_lr: float, steps: int) -> float:
    """EMA factor whose window (1/(1−β) steps) spans a quarter decade of the sweep, within [0.6, 0.98]."""
    steps_per_decade = (steps - 1) / math.log10(max_lr / min_lr)
    return min(0.98, max(0.6, 1.0 - 4.0 / max(steps_per_decade, 1e-9)))


def lr_range_test(cfg, *, min_lr: float = 1e-7, max_lr: float = 1.0, steps: int = 100, beta: float | None = None,
                  diverge_factor: float = 4.0, log_every: int = 10) -> LRFindResult:
    """Run the LR range test for the pretraining config ``cfg`` (nothing is written to ``cfg.output_dir``) with
    the trainer's own step (``pretrain.steps``). ``beta``: EMA factor of the smoothed loss (None:
    :func:`auto_smoothing`)."""
    from .ewc import resolve_source
    from .metrics import weighted_loss
    from .steps import build_step
    from .trainer import setup, train_loader

    if cfg.decouple.mode != "none":
        raise ValueError("the LR range test trains end to end: run it with decouple.mode=none (the chunks of a "
                         "decoupled run use the same train.lr)")
    lrs = exponential_lrs(min_lr, max_lr, steps)
    beta = auto_smoothing(min_lr, max_lr, steps) if beta is None else beta
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}")
    cfg = resolve_source(cfg)
    # the sweep sets the LR itself; a constant schedule also keeps Adam's beta1 fixed (one-cycle would cycle it)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="constant"))
    t = cfg.train
    step_runner = build_step(cfg)
    with tempfile.TemporaryDirectory() as scratch:  # continued pretraining's Fisher file, not the run directory
        data, _, objective, collator, _ = setup(cfg, step_runner, Path(scratch))
    batches = iter(train_loader(cfg, step_runner, collator, data, start_step=0))

    smoother = SmoothedLoss(beta)
    done_lrs, losses, smoothed, best, reason = [], [], [], math.inf, "completed"
    for i, lr in enumerate(lrs):
        step_runner.train_step([next(batches) for _ in range(t.grad_accum)], lr, i)
        metrics = step_runner.window_metrics()  # token-exact over the step's window and every process
        loss_value = weighted_loss(objective.loss_parts, metrics)
        if not (math.isfinite(loss_value) and math.isfinite(metrics["grad_norm"])):
            reason = "non-finite"
            break
        value = smoother.update(loss_value)
        done_lrs.append(lr)
        losses.append(loss_value)
        smoothed.append(value)
        best = min(best, value)
        if log_every and (i + 1) % log_every == 0 and step_runner.is_logger:
            print(f"lr_find step {i + 1:>4}/{steps} | lr {lr:.2e} | loss {loss_value:.4f} | smoothed {value:.4f}",
                  flush=True)
        if value > diverge_factor * best:
            reason = "diverged"
            break
    main_process = step_runner.is_main
    step_runner.close()
    settings = dict(min_lr=min_lr, max_lr=max_lr, steps=steps, beta=beta, diverge_factor=diverge_factor,
                    objective=cfg.objective.name, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                    world_size=step_runner.world_size)
    return LRFindResult(lrs=done_lrs, losses=losses, smoothed=smoothed, stop_reason=reason, settings=settings,
                        main_process=main_process, **suggest_lrs(done_lrs, smoothed))


def write_results(result: LRFindResult, out_dir: str | Path) -> dict[str, Path]:
    """``lr_find.csv`` (step, lr, loss, smoothed_loss), ``lr_find.json`` (suggestions + settings) and
    ``lr_find.png`` (loss vs LR on a log axis, suggestions marked)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "lr_find.csv", "json": out / "lr_find.json", "png": out / "lr_find.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, sm) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            writer.writerow([i, f"{lr:.6e}", f"{loss:.6f}", f"{sm:.6f}"])
    summary = {k: v for k, v in asdict(result).items() if k not in ("lrs", "losses", "smoothed", "main_process")}
    summary["suggestion"] = result.suggestion
    summary["steps_done"] = len(result.lrs)
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    marks = (("steepest", result.steepest, "C3"), ("min / 10", result.min_over_10, "C2"))
    for name, lr, color in marks:
        if lr is not None:
            ax.axvline(lr, color=color, ls="--", lw=1, label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if result.smoothed:  # keep the diverging tail from squashing the interesting part of the curve
        low, high = min(result.smoothed), result.smoothed[0]
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), max(high, low) + 0.3 * (high - low + 1e-9))
    ax.set_title(f"LR range test ({result.stop_reason} after {len(result.lrs)} steps)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lr_find", description="LR range test: sweep the LR exponentially over N steps of the configured run, "
                                    "plot the smoothed loss and suggest train.lr.")
    parser.add_argument("config", help="pretraining YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=64")
    parser.add_argument("--min-lr", type=float, default=1e-7, help="first LR of the sweep (default 1e-7)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="last LR of the sweep (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in the sweep (default 100)")
    parser.add_argument("--smoothing", type=float, default=None,
                        help="EMA factor β of the smoothed loss (default: the EMA spans a quarter decade of LR, "
                             "0.72 for 100 steps over 1e-7..1; fastai uses 0.98, which lags by ~49 steps)")
    parser.add_argument("--diverge-factor", type=float, default=4.0,
                        help="stop once the smoothed loss exceeds this multiple of its best value (default 4)")
    parser.add_argument("--out", help="output directory (default OUTPUT_DIR/lr_find)")
    args = parser.parse_args(argv)

    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import datasets

    from .config import ConfigError, load_config
    from .data.demo import DemoCorpusError

    datasets.disable_progress_bars()
    try:
        cfg = load_config(args.config, args.overrides)
        result = lr_range_test(cfg, min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps,
                               beta=args.smoothing, diverge_factor=args.diverge_factor)
    except (ConfigError, ValueError, FileNotFoundError, DemoCorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.main_process:
        return 0
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "lr_find"
    paths = write_results(result, out)
    print(f"stopped: {result.stop_reason} after {len(result.lrs)} of {args.steps} steps "
          f"(LR {args.min_lr:.1e} -> {result.lrs[-1] if result.lrs else args.min_lr:.2e})")
    if result.suggestion is None:
        print("no suggestion: the loss was not finite from the first step; lower --min-lr")
        return 1
    print(f"steepest descent at lr = {result.steepest:.2e}" if result.steepest is not None
          else "too few steps before the minimum for a slope")
    print(f"minimum smoothed loss at lr = {result.min_loss_lr:.2e}; minimum / 10 = {result.min_over_10:.2e}")
    command = " ".join(["python scripts/pretrain.py", args.config, *args.overrides, f"train.lr={result.suggestion:.2e}"])
    print(f"suggested peak LR: {result.suggestion:.2e}. Use it as:\n  {command}")
    print(f"  (with train.schedule=onecycle a higher peak trains too, up to about {result.min_loss_lr:.2e})")
    print(f"wrote {paths['csv']}, {paths['json']} and {paths['png']}")
    return 0
