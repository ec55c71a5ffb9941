"""Plots of one or more runs' ``metrics.jsonl``: loss parts (train solid, eval dashed with markers), each
objective's weighted total loss on its own panel, LR, tok/s and the other eval metrics against the step or the
number of training tokens, runs overlaid (legend = run name), one subplot per quantity. matplotlib with the Agg backend: works headless.

A resumed run re-logs the steps it redoes after its last checkpoint: the last record per (split, step) wins, which
is the curve of the run that continued.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

#: keys of a record that are bookkeeping, not metrics to plot
NOT_METRICS = {"split", "time", "step", "tokens", "event", "config", "world_size", "skipped_steps"}


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """``{split: [record, ...]}`` sorted by step, keeping the last record per (split, step). Lines that are not
    JSON (e.g. the half-written last line of a killed run) are skipped with a warning."""
    path = Path(run_dir)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    by_split: dict[str, dict[int, dict]] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        by_split.setdefault(record.get("split", "train"), {})[int(record["step"])] = record
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON", stacklevel=2)
    return {split: [records[s] for s in sorted(records)] for split, records in by_split.items()}


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """Legend names: each run directory's name, or its last path parts where names would collide."""
    paths = [Path(p).resolve() for p in run_dirs]
    paths = [p.parent if p.is_file() else p for p in paths]  # a metrics.jsonl is named after its run
    for depth in range(1, 1 + max(len(p.parts) for p in paths)):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _value(record: dict, key: str) -> float:
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _x_values(records: list[dict], x: str, train: list[dict]) -> np.ndarray:
    steps = np.array([r["step"] for r in records], dtype=float)
    if x == "step":
        return steps
    # eval records carry no token count: map steps to tokens through the train records (0 tokens at step 0)
    known = [(r["step"], r["tokens"]) for r in train if isinstance(r.get("tokens"), (int, float))]
    if not known:
        return np.full(len(records), math.nan)
    xs, ys = zip(*([(0, 0)] + known))
    return np.interp(steps, xs, ys)


def objective_name(run: dict[str, list[dict]]) -> str | None:
    """The objective a run trained, from the config in its start record (None if it has none)."""
    for record in run.get("run", []):
        objective = (record.get("config") or {}).get("objective")
        if isinstance(objective, dict) and objective.get("name"):
            return str(objective["name"])
    return None


def _numeric_keys(records: list[dict]) -> set[str]:
    return {k for r in records for k, v in r.items() if isinstance(v, (int, float)) or v is None}


def panels(runs: list[dict[str, list[dict]]]) -> list[tuple[str, list[tuple[str, str]], list[int]]]:
    """The subplots: (title, [(split, key), ...], indices of the runs drawn in it) over the keys any run logged.

    Loss parts (``*_loss``) are comparable across runs; an objective's weighted total (``loss``) is not (MLM's is
    its one part, SpanBERT's adds the SBO, ELECTRA's weighs the discriminator ×50), so each objective whose total is
    more than one part gets its own total panel, "loss (<objective>)", with only its runs."""
    train_keys = set().union(*(_numeric_keys(run.get("train", [])) for run in runs))
    eval_keys = set().union(*(_numeric_keys(run.get("eval", [])) for run in runs))
    everyone = list(range(len(runs)))

    def series(key: str) -> list[tuple[str, str]]:
        return [(split, key) for split, keys in (("train", train_keys), ("eval", eval_keys)) if key in keys]

    result = []
    totals: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        keys = _numeric_keys(run.get("train", []) + run.get("eval", []))
        parts = sorted(k for k in keys if k.endswith("_loss"))
        if "loss" in keys and len(parts) > 1:  # the weighted total, when it is not the one part
            totals.setdefault(objective_name(run) or "+".join(parts), []).append(i)
    for objective, members in totals.items():
        result.append((f"loss ({objective})", series("loss"), members))
    losses = sorted(k for k in train_keys | eval_keys if k.endswith("_loss"))
    result += [(k, series(k), everyone) for k in losses]
    for key, title in (("lr", "learning rate"), ("tok_per_s", "tokens / s")):
        if key in train_keys:
            result.append((title, [("train", key)], everyone))
    others = sorted(k for k in eval_keys - set(losses) - {"loss"} - NOT_METRICS if not k.startswith("n_"))
    result += [(f"eval {k}", [("eval", k)], everyone) for k in others]
    return result


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "step", names: list[str] | None = None,
              columns: int = 3) -> Path:
    """Draw every run of ``run_dirs`` into one grid of subplots and save it to ``out`` (PNG, SVG, PDF...)."""
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [read_metrics(d) for d in run_dirs]
    names = names or run_names(run_dirs)
    grid = panels(runs)
    if not grid:
        raise ValueError(f"no train or eval metrics to plot in {', '.join(map(str, run_dirs))}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(columns, len(grid))
    rows = math.ceil(len(grid) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, series, members) in zip(axes.flat, grid):
        for i in members:
            run, name, color = runs[i], names[i], f"C{i % 10}"
            train = run.get("train", [])
            for split, key in series:
                records = [r for r in run.get(split, []) if key in r]
                if not records:
                    continue
                xs, ys = _x_values(records, x, train), np.array([_value(r, key) for r in records])
                label = name if len(series) == 1 else f"{name} ({split})"
                style = dict(ls="-", lw=1.2) if split == "train" else dict(ls="--", marker="o", ms=3, lw=1.2)
                ax.plot(xs, ys, color=color, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("training tokens" if x == "tokens" else "step")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(grid):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot", description="Plot the metrics.jsonl of one or more runs (overlaid) into one image.")
    parser.add_argument("runs", nargs="+", help="run directories (OUTPUT_DIR of pretraining runs) or metrics.jsonl")
    parser.add_argument("--out", required=True, help="image file to write (.png, .svg, .pdf)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default step)")
    parser.add_argument("--names", nargs="+", help="legend names, one per run (default: the run directories' names)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        print(f"error: --names has {len(args.names)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        path = plot_runs(args.runs, args.out, x=args.x, names=args.names)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
