"""Time to quality (issue 18): held-out MLM loss against training tokens and against wall clock for backprop and
the decoupled arms, on the same data, seed and global batch, each arm a real run of ``scripts/pretrain.py``.

Arms (``ARMS``: processes × threads each, overrides): backprop on 1 process with 2 threads and with 1 thread; on 2
processes × 1 thread (``torchrun``, gloo): local updates K = 2, with one overlapping layer, with a deeper auxiliary
head (one transformer layer before chunk 0's decoder: a remedy from related work, Belilovsky et al. 2019, labelled
as such), local then backprop
(switching at ``--switch-at`` of the steps), the shipped synthetic-gradient setting and its hybrid, and the
frozen-random lower chunk (the control). Every arm evaluates the same fixed validation blocks every
``--eval-every`` steps.

Wall clock of an evaluation at step s = time of step s's train record − the run's start record − the time spent in
the evaluations before s (so evaluation cost is not charged to training; data preparation happens before the start
record). Reported per shape, for the seed-averaged curves (``curves``, ``summary``) and for each seed alone
(``seeds``: its curves and summary, so the spread between seeds is in the file):

* G at equal tokens: G(s) = (L_frozen(s) − L(s)) / (L_frozen(s) − L_backprop(s)) at every evaluation step (the
  fraction of the frozen→backprop gap an arm closes; backprop = the 2-thread arm);
* G at equal wall time: the same with every curve interpolated at the wall times of the 2-thread backprop arm's
  evaluations (an arm not yet started at t has no value);
* the wall time at which an arm first reaches backprop's final held-out loss (linear interpolation between
  evaluations; null if it never does), the per-chunk auxiliary-head losses of the decoupled arms, and the layer
  probes' accuracies (``probe_acc_layer{n}``) where ``train.probe`` is on.

Writes ``benchmarks/quality-<date>.json`` and a PNG beside it (loss vs tokens and vs wall clock, one row per shape).
Runs are resumable: an arm whose output directory already holds its final evaluation is read, not re-run, and an
interrupted arm resumes from its checkpoint at its last evaluation (its output goes to ``<arm>-seed<s>.log`` beside
it, so it also outlives a killed benchmark process). Before any arm trains, every existing arm directory is checked
against the protocol asked for (config and processes): one of another protocol is refused, never mixed in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from ..config import config_differences, config_to_dict, load_config
from .common import default_out, environment

ROOT = Path(__file__).resolve().parents[2]

#: arm -> (processes, threads per process, overrides); ``{switch}`` = ``--switch-at`` × steps, ``{half}`` = half the
#: batch and ``{eval2}`` = twice ``--eval-batches`` (the same validation blocks in micro-batches of half the size)
LOCAL = ["decouple.mode=local", "decouple.chunks=2"]
SHIPPED_SG = ["decouple.mode=synthetic", "decouple.chunks=2", "decouple.synthetic.mix=0.5",
              "decouple.synthetic.staleness=1", "train.micro_batch_size={half}", "train.grad_accum=2",
              "train.eval_batches={eval2}"]  # configs/decoupled-sg.yaml: two micro-batches per step, λ = 0.5, S = 1
ARMS = {
    "backprop-2threads": (1, 2, ["decouple.mode=none", "decouple.chunks=1"]),
    "backprop-1thread": (1, 1, ["decouple.mode=none", "decouple.chunks=1"]),
    "local-K2": (2, 1, LOCAL),
    "local-K2-overlap1": (2, 1, [*LOCAL, "decouple.overlap=1"]),
    # not in Laskin et al.: a deeper auxiliary problem, the remedy of Belilovsky et al. 2019 ("Greedy layerwise
    # learning can scale to ImageNet": 2- and 3-hidden-layer auxiliary networks close more of the gap to end to end
    # than 1-hidden-layer ones); here one extra transformer layer before chunk 0's MLM decoder
    "local-K2-layerhead": (2, 1, [*LOCAL, "decouple.aux_head=layer"]),
    "local-K2-then-backprop": (2, 1, [*LOCAL, "decouple.until_step={switch}"]),
    "synthetic-K2": (2, 1, SHIPPED_SG),
    "synthetic-K2-then-backprop": (2, 1, [*SHIPPED_SG, "decouple.until_step={switch}"]),
    "frozen-lower-K2": (2, 1, [*LOCAL, "decouple.freeze_lower=true"]),
}
#: shape name -> model overrides (the two shapes of benchmarks/RESULTS.md)
SHAPES = {
    "h128-L4": ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=2", "model.intermediate_size=512"],
    "h256-L8": ["model.hidden_size=256", "model.num_layers=8", "model.num_heads=4", "model.intermediate_size=1024"],
}
BASELINE, CONTROL = "backprop-2threads", "frozen-lower-K2"


class ProtocolError(ValueError):
    """An arm's run directory holds a run of another protocol."""


#: config keys that change neither what an arm learns nor how fast (where the cache is, logging, loader processes)
NOT_COMPARED = ("output_dir", "data.cache_dir", "data.num_workers", "data.num_proc", "train.ewc.fisher_data.num_proc",
                "log.")


def run_dir(args, shape: str, arm: str, seed: int) -> Path:
    return args.out_runs / shape / f"{arm}-seed{seed}"


def arm_overrides(args, shape: str, arm: str, seed: int) -> list[str]:
    """The dotted overrides of ``scripts/pretrain.py`` for one arm on one shape and seed."""
    formatted = (o.format(switch=max(1, round(args.switch_at * args.steps)), half=args.batch // 2,
                          eval2=2 * args.eval_batches) for o in ARMS[arm][2])
    return [f"output_dir={run_dir(args, shape, arm, seed)}", f"train.seed={seed}", f"train.max_steps={args.steps}",
            f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
            f"train.eval_batches={args.eval_batches}", f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
            f"train.save_every={args.eval_every}", "log.tensorboard=false", *SHAPES[shape], *formatted, *args.override]


def check_existing(args, shape: str, arm: str, seed: int) -> None:
    """Refuse to read or resume an arm's directory that holds a run of another protocol (a different config, in
    anything but :data:`NOT_COMPARED`, or another number of processes): its curve would be reported as this one's.
    Stricter than a resumed run's own check, which lets ``train.max_steps`` or ``train.probe`` change."""
    out = run_dir(args, shape, arm, seed)
    if not (out / "config.yaml").is_file():
        return
    expected = config_to_dict(load_config(args.config, arm_overrides(args, shape, arm, seed)))
    problems = config_differences(yaml.safe_load((out / "config.yaml").read_text()) or {}, expected, NOT_COMPARED)
    start = next((r for r in records(out) if r["split"] == "run" and r.get("event") == "start"), None)
    if start is not None and start.get("world_size", 1) != ARMS[arm][0]:
        problems.append(f"processes: {start.get('world_size', 1)} -> {ARMS[arm][0]}")
    if problems:
        raise ProtocolError(f"{out} holds a run of another protocol than {shape} {arm} seed {seed} asks for "
                            "(saved -> asked):\n  " + "\n  ".join(problems) + "\npass another --out-runs, or move "
                            "that directory aside to train this arm afresh")


def run_arm(args, shape: str, arm: str, seed: int) -> Path:
    """Train one arm (unless its final evaluation is already there); returns its output directory."""
    out = run_dir(args, shape, arm, seed)
    if final_eval(out, args.steps) is not None:
        return out
    processes, threads, _ = ARMS[arm]
    script = [str(ROOT / "scripts" / "pretrain.py"), str(args.config), *arm_overrides(args, shape, arm, seed)]
    if processes > 1:  # --standalone: a local rendezvous on a free port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *script]
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: the arm outlives a killed benchmark process
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shape} {arm} seed {seed} failed (exit {proc.returncode}); its output ends:\n"
                           f"{log.read_text()[-4000:]}")
    return out


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def final_eval(run: Path, steps: int) -> dict | None:
    return next((r for r in reversed(records(run)) if r["split"] == "eval" and r["step"] == steps), None)


def curve(run: Path) -> dict[str, list]:
    """The run's evaluations: step, tokens, training wall seconds, held-out loss/accuracy, per-chunk losses and
    probes. A run resumed from its checkpoint at step s (a ``resume`` record) continues the wall clock of step s;
    what the interrupted process logged after s is dropped (the resumed one computes it again)."""
    points: dict[int, dict] = {}  # step -> its evaluation point
    walls: dict[int, float] = {}  # train step -> training wall seconds
    train: dict = {}
    base = seg_start = spent = 0.0
    for r in records(run):
        if r["split"] == "run" and r.get("event") in ("start", "resume"):
            base = walls.get(r["step"], 0.0)
            points = {s: p for s, p in points.items() if s <= r["step"]}
            walls = {s: w for s, w in walls.items() if s <= r["step"]}
            seg_start, spent, train = r["time"], 0.0, {}
        elif r["split"] == "train":
            train[r["step"]] = r
            walls[r["step"]] = base + r["time"] - seg_start - spent
        elif r["split"] == "eval" and r["step"] in train:
            t = train[r["step"]]
            points[r["step"]] = {
                "step": r["step"], "tokens": t["tokens"], "wall_s": walls[r["step"]], "loss": r["mlm_loss"],
                "acc": r["mlm_acc"],
                "chunks": {k: v for k, v in r.items() if k.startswith("chunk") and k.endswith("_mlm_loss")},
                "probes": {k: v for k, v in r.items() if k.startswith("probe_acc_layer")}}
            spent += r["time"] - t["time"]  # evaluation is not charged to training
    ordered = [points[s] for s in sorted(points)]
    return {key: [p[key] for p in ordered] for key in ("step", "tokens", "wall_s", "loss", "acc", "chunks", "probes")}


def mean_curve(curves: list[dict]) -> dict[str, list]:
    """Seeds averaged at each evaluation step they share."""
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    result = {"step": steps}
    for key in ("tokens", "wall_s", "loss", "acc"):
        result[key] = [float(np.mean([c[key][c["step"].index(s)] for c in curves])) for s in steps]
    for key in ("chunks", "probes"):
        result[key] = [{k: float(np.mean([c[key][c["step"].index(s)][k] for c in curves]))
                        for k in curves[0][key][curves[0]["step"].index(s)]} for s in steps]
    return result


def gap_closed(loss, frozen, backprop):
    """G = (L_frozen − L) / (L_frozen − L_backprop), elementwise (None where the gap is 0 or a value is missing)."""
    return [None if None in (a, f, b) or f == b else (f - a) / (f - b) for a, f, b in zip(loss, frozen, backprop)]


def at_times(c: dict, times: list[float]) -> list[float | None]:
    """Loss interpolated at wall ``times`` (None before the first evaluation or after the last)."""
    w, loss = np.array(c["wall_s"]), np.array(c["loss"])
    return [float(np.interp(t, w, loss)) if w[0] <= t <= w[-1] else None for t in times]


def time_to_reach(c: dict, target: float) -> float | None:
    """First wall time at which the loss curve reaches ``target`` (linear between evaluations)."""
    for i, (w, loss) in enumerate(zip(c["wall_s"], c["loss"])):
        if loss <= target:
            if i == 0:
                return w
            w0, l0 = c["wall_s"][i - 1], c["loss"][i - 1]
            return w0 + (w - w0) * (l0 - target) / (l0 - loss)
    return None


def summarise(curves: dict[str, dict]) -> dict[str, dict]:
    """Per arm (seed-averaged curves): G at equal tokens and wall time, time to backprop's final loss."""
    bp, frozen = curves.get(BASELINE), curves.get(CONTROL)
    result = {}
    for arm, c in curves.items():
        row = {"final_loss": c["loss"][-1], "final_acc": c["acc"][-1], "wall_s": c["wall_s"][-1],
               "final_chunk_losses": c["chunks"][-1], "final_probes": c["probes"][-1]}
        if bp and frozen:
            shared = [s for s in c["step"] if s in bp["step"] and s in frozen["step"]]

            def at(x, s):
                return x["loss"][x["step"].index(s)]

            row["G_tokens"] = dict(zip(shared, gap_closed([at(c, s) for s in shared], [at(frozen, s) for s in shared],
                                                          [at(bp, s) for s in shared])))
            times = bp["wall_s"]
            row["G_wall"] = dict(zip([round(t, 1) for t in times], gap_closed(
                at_times(c, times), at_times(frozen, times), bp["loss"])))
            row["time_to_backprop_final_s"] = time_to_reach(c, bp["loss"][-1])
        result[arm] = row
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.8 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        seeds = results["shapes"][shape].get("seeds", {})
        for i, (arm, c) in enumerate(results["shapes"][shape]["curves"].items()):
            for ax, x in zip(row, ("tokens", "wall_s")):
                ax.plot(c[x], c["loss"], color=f"C{i}", marker="o", ms=2, lw=1.2,
                        label=arm if len(seeds) < 2 else f"{arm} (mean of {len(seeds)} seeds)")
                for one in (seeds.values() if len(seeds) > 1 else ()):  # each seed thin, behind the mean
                    ax.plot(one["curves"][arm][x], one["curves"][arm]["loss"], color=f"C{i}", lw=0.6, alpha=0.45)
        for ax, label in zip(row, ("training tokens", "training wall clock (s)")):
            ax.set_title(f"{shape}: held-out MLM loss")
            ax.set_xlabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def suite_quality(args) -> dict:
    args.out_runs.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment("cpu"), "protocol": {
        "config": str(args.config), "steps": args.steps, "eval_every": args.eval_every, "batch": args.batch,
        "eval_batches": args.eval_batches, "seeds": args.seeds, "overrides": args.override,
        "arms": {a: {"processes": ARMS[a][0], "threads": ARMS[a][1], "overrides": ARMS[a][2]} for a in args.arms}},
        "shapes": {}}
    for shape in args.shapes:  # every existing directory checked before the first arm trains
        for arm in args.arms:
            for seed in args.seeds:
                check_existing(args, shape, arm, seed)
    for shape in args.shapes:
        per_arm, per_seed = {}, {seed: {} for seed in args.seeds}
        for arm in args.arms:
            for seed in args.seeds:
                per_seed[seed][arm] = curve(run_arm(args, shape, arm, seed))
            per_arm[arm] = mean_curve([per_seed[seed][arm] for seed in args.seeds])
            print(json.dumps({"shape": shape, "arm": arm, "final_loss": per_arm[arm]["loss"][-1],
                              "wall_s": round(per_arm[arm]["wall_s"][-1], 1)}), flush=True)
        results["shapes"][shape] = {"curves": per_arm, "summary": summarise(per_arm),
                                    "seeds": {str(seed): {"curves": c, "summary": summarise(c)}
                                              for seed, c in per_seed.items()}}
    out = args.out or default_out("quality")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    return results
