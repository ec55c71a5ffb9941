"""MLM vs SpanBERT vs ELECTRA on the demo corpus, same tokens, steps, seed and schedule, then every export scored by
pretrain/evaluation.py (held-out MLM and span infilling with fixed masks, WordNet-supersense linear probe).

    python scripts/compare_objectives.py [--steps 1500] [--out runs/compare] [--results benchmarks]

Arms (each a normal run of scripts/pretrain.py into OUT/<arm>/, resumable; a finished arm is not retrained):
mlm-seed0 (configs/tiny.yaml), span-seed0 (configs/spanbert-tiny.yaml), electra-seed0 (configs/electra-tiny.yaml) and
mlm-seed1 (the seed-to-seed spread), all with the same overrides (--override adds more). Before training, the resolved
configs are checked to differ only in the objective, the seed and the output directory.

Equal compute: every arm trains the same number of steps on the same batch of blocks (same tokens). The train
FLOPs of one step are measured (torch FlopCounterMode, one real forward+backward, attention on the math kernel so its
matmuls are counted) and reported beside the wall-clock: ELECTRA's count includes its generator and its per-token
discriminator head; its discriminator alone has the MLM encoder's size, so its probe is compared with the MLM
encoder's. ELECTRA's generator has an MLM head and is scored too, separately (it is 1/4 of the width).

Writes the table into the "## Objectives (MLM vs SpanBERT vs ELECTRA)" section of RESULTS/RESULTS.md (other sections
are kept) and the raw numbers into RESULTS/objectives-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Objectives (MLM vs SpanBERT vs ELECTRA)"

#: arm -> (config, seed); the order is the training order (the second MLM seed last)
ARMS = {
    "mlm-seed0": ("configs/tiny.yaml", 0),
    "span-seed0": ("configs/spanbert-tiny.yaml", 0),
    "electra-seed0": ("configs/electra-tiny.yaml", 0),
    "mlm-seed1": ("configs/tiny.yaml", 1),
}
#: the same for every arm: 2 layers x 128 (leaves the unigram plateau well within a CPU budget), no dropout
COMMON = ["model.num_layers=2", "train.lr=2e-3", "train.warmup_steps=100", "model.hidden_dropout=0",
          "model.attention_dropout=0", "train.micro_batch_size=32", "train.grad_accum=1", "train.eval_every=0",
          "train.log_every=100", "log.tensorboard=false"]


def arm_overrides(args, arm: str) -> list[str]:
    _, seed = ARMS[arm]
    return [*COMMON, f"train.max_steps={args.steps}", f"train.save_every={args.steps}", f"train.seed={seed}",
            f"output_dir={args.out / arm}", *args.override]


def check_same_setup(args) -> dict:
    """Resolved configs must differ only in objective, seed and output_dir; returns arm -> resolved Config."""
    from pretrain.config import config_differences, config_to_dict, load_config

    configs = {arm: load_config(ROOT / ARMS[arm][0], arm_overrides(args, arm)) for arm in args.arms}

    def comparable(cfg):
        d = config_to_dict(cfg)
        d.pop("output_dir"), d.pop("objective"), d["train"].pop("seed")
        return d

    ref_arm = args.arms[0]
    for arm, cfg in configs.items():
        diffs = config_differences(comparable(configs[ref_arm]), comparable(cfg))
        if diffs:
            raise SystemExit(f"{arm} differs from {ref_arm} beyond objective/seed/output_dir: {diffs}")
    return configs


class LoadSampler:
    """Samples the 1-minute load average every few seconds while a run trains (other jobs share the 2 cores)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"load1_mean": round(sum(self.samples) / len(self.samples), 2), "load1_max": max(self.samples)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train_arm(args, arm: str) -> dict:
    """Run the CLI for one arm (or reuse a finished run) and return its timing record."""
    out = args.out / arm
    record_path = out / "compare_run.json"
    if record_path.is_file() and (out / "export").is_dir():
        record = json.loads(record_path.read_text())
        if record.get("steps") == args.steps:
            print(f"[{arm}] finished before: reusing {out}", flush=True)
            return record
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), str(ROOT / ARMS[arm][0]), *arm_overrides(args, arm)]
    print(f"[{arm}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    with LoadSampler() as load, open(out.parent / f"{arm}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"[{arm}] failed (exit {proc.returncode}); see {out.parent / f'{arm}.log'}")
    metrics = read_metrics(out)
    starts = [m for m in metrics if m.get("split") == "run" and m.get("event") in ("start", "resume")]
    train = [m for m in metrics if m.get("split") == "train"]
    if not starts or not train or train[-1]["step"] != args.steps:
        raise SystemExit(f"[{arm}] metrics.jsonl does not reach step {args.steps}")
    train_seconds = train[-1]["time"] - starts[-1]["time"]
    resumed = starts[-1]["step"] > 0
    steps_timed = args.steps - starts[-1]["step"]
    record = {"arm": arm, "steps": args.steps, "wall_seconds": round(wall, 1),
              "train_seconds": round(train_seconds, 1), "resumed_from": starts[-1]["step"] if resumed else None,
              "tok_per_s": round(steps_timed * train[-1]["tokens"] / args.steps / train_seconds),
              "final_train": {k: v for k, v in train[-1].items() if k.endswith(("_loss", "_acc")) or k == "loss"},
              **load.summary()}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[{arm}] {json.dumps(record)}", flush=True)
    return record


def step_flops(cfg) -> dict:
    """Train FLOPs of one optimizer step of ``cfg`` (forward + backward of one real micro-batch x grad_accum),
    counted by FlopCounterMode with SDPA on the math kernel (so attention matmuls are counted on the CPU)."""
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.data import prepare_blocks

    data = prepare_blocks(cfg)
    objective = cfg.objective.build(data.tokenizer, cfg.train.seed, data.unigram_counts)
    torch.manual_seed(cfg.train.seed)
    model = objective.build_model(cfg.model)
    collator = copy.deepcopy(objective)
    batch = collator.collate([dict(data.train[i], index=i) for i in range(cfg.train.micro_batch_size)])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective(model, batch)["loss"].backward()
    per_micro = counter.get_total_flops()
    groups = {"discriminator": "discriminator", "generator": "generator"}
    params = {name: sum(p.numel() for p in getattr(model, attr).parameters()) for name, attr in groups.items()
              if hasattr(model, attr)} or {"model": sum(p.numel() for p in model.parameters())}
    params["objective_heads"] = sum(p.numel() for p in objective.parameters())
    return {"train_flops_per_step": per_micro * cfg.train.grad_accum,
            "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.block_size,
            "parameters": params}


def evaluate_all(args, configs: dict) -> dict:
    import transformers

    from pretrain.evaluation import EvalOptions, evaluate_export

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    options = EvalOptions(probe_train=args.probe_train, probe_test=args.probe_test)
    shared: dict = {}
    results = {}

    def run(name, export, config, **kw):
        start = time.perf_counter()
        opts = EvalOptions(**{**options.__dict__, **kw}) if kw else options
        results[name] = evaluate_export(export, opts, config=config, max_blocks=args.eval_blocks, _shared=shared)
        print(f"[eval {name}] {time.perf_counter() - start:.0f}s", flush=True)

    for arm in args.arms:
        run(arm, args.out / arm / "export", args.out / arm / "config.yaml")
    if "mlm-seed1" in args.arms and "mlm-seed0" in args.arms:
        # train.seed also picks the train/validation document split: mlm-seed1 is scored above on its own validation
        # split; here on seed 0's (the split every seed-0 arm is scored on), most of whose documents it trained on
        run("mlm-seed1@seed0-split", args.out / "mlm-seed1" / "export", args.out / "mlm-seed0" / "config.yaml")
    if "mlm-seed0" in args.arms:
        run("random-init", args.out / "mlm-seed0" / "export", args.out / "mlm-seed0" / "config.yaml",
            random_init=True)
    return results


# --------------------------------------------------------------------------- report


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def pick(result: dict) -> dict:
    """Flat numbers of one evaluated export (ELECTRA run: generator MLM/span, discriminator probe)."""
    if result.get("kind") == "electra-run":
        gen, disc = result["generator"], result["discriminator"]
        return {"mlm_loss": None, "mlm_acc": None, "span_acc": None, "span_exact": None,
                "probe_acc": disc["probe"]["accuracy"], "probe_f1": disc["probe"]["macro_f1"],
                "gen_mlm_loss": gen["mlm"]["loss"], "gen_mlm_acc": gen["mlm"]["acc"],
                "gen_span_acc": gen["span_infilling"]["token_acc"],
                "gen_span_exact": gen["span_infilling"]["exact_span_acc"], "gen_probe_acc": gen["probe"]["accuracy"]}
    out = {"probe_acc": result["probe"]["accuracy"], "probe_f1": result["probe"]["macro_f1"]}
    if "mlm" in result:
        out.update(mlm_loss=result["mlm"]["loss"], mlm_acc=result["mlm"]["acc"],
                   span_acc=result["span_infilling"]["token_acc"],
                   span_exact=result["span_infilling"]["exact_span_acc"])
    return out


METRICS = ("mlm_loss", "mlm_acc", "span_acc", "span_exact", "probe_acc")


def spread_and_gaps(flat: dict) -> tuple[dict, dict]:
    """Seed spread of the MLM arm (the larger of its two measurements: own split / seed 0's split) and every arm's
    difference to mlm-seed0 in units of that spread."""
    spread = {}
    for m in METRICS:
        values = [abs(flat[k][m] - flat["mlm-seed0"][m]) for k in ("mlm-seed1", "mlm-seed1@seed0-split")
                  if k in flat and flat[k].get(m) is not None and flat["mlm-seed0"].get(m) is not None]
        spread[m] = max(values) if values else None
    gaps = {}
    for arm, values in flat.items():
        if arm.startswith("mlm-seed") or "mlm-seed0" not in flat:
            continue
        gaps[arm] = {}
        for m in METRICS:
            a, b = values.get(m), flat["mlm-seed0"].get(m)
            if a is None or b is None:
                continue
            diff = a - b
            gaps[arm][m] = {"diff": diff, "x_spread": abs(diff) / spread[m] if spread.get(m) else None}
    return spread, gaps


def plateau_check(report: dict, out: Path) -> dict:
    """Per arm: did the held-out loss leave its plateau? MLM-headed models: masked-token loss vs the unigram loss
    of the same targets (MLM and span infilling); ELECTRA's discriminator: its final validation BCE (from the run's
    metrics.jsonl) vs the entropy of its base rate of replaced tokens."""
    import math

    checks = {}
    for name, result in report["evaluations"].items():
        if name == "random-init" or "@" in name:
            continue
        r = result["generator"] if result.get("kind") == "electra-run" else result
        prefix = f"{name} (generator)" if result.get("kind") == "electra-run" else name
        for task in ("mlm", "span_infilling"):
            if task in r and "unigram_loss" in r[task]:
                value, plateau = r[task]["loss"], r[task]["unigram_loss"]
                checks[f"{prefix} {task}"] = {"value": value, "plateau": plateau, "left": plateau - value > 0.1}
        if result.get("kind") == "electra-run" and (out / name / "metrics.jsonl").is_file():
            evals = [m for m in read_metrics(out / name) if m.get("split") == "eval" and "disc_loss" in m]
            if evals:
                final = evals[-1]
                p = final["n_replaced"] / final["n_tokens"]
                entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
                checks[f"{name} discriminator BCE"] = {"value": final["disc_loss"], "plateau": entropy,
                                                       "left": entropy - final["disc_loss"] > 0.02,
                                                       "disc_acc_replaced": final.get("disc_acc_replaced")}
    return checks


def markdown(report: dict) -> str:
    """The RESULTS.md section, from the raw report alone (so `--from-json` can re-render it)."""
    runs, flops, flat = report["runs"], report["flops"], report["flat"]
    arms, steps = list(report["arms"]), report["steps"]
    probe = report["evaluations"].get("mlm-seed0", {}).get("probe", {})
    mlm_flops = flops.get("mlm-seed0", {}).get("train_flops_per_step")
    spread, gaps = report["seed_spread"], report["gaps_vs_mlm_seed0"]
    host = report["host"]
    lines = [SECTION, "",
             f"Measured {report['date']} on **{host['cpu']} ({host['cores']} cores), CPU only** (GPU: not measured); "
             f"torch {host['torch']}, transformers {host['transformers']}, {report['threads']} torch thread(s) per run. "
             "Other jobs may share the machine: the load column is the mean 1-minute load average during each "
             "run. Command:", "", "```bash", report["command"], "```", "",
             f"Every arm: demo corpus (bible + pydoc + gcide; WordNet glosses are not in it), WordPiece 8192, blocks "
             f"of 128, **{steps} steps × 32 blocks = {steps * 32 * 128 / 1e6:.1f}M tokens**, 2 layers × 128 "
             "(2 heads, FFN 512), lr 2e-3 linear decay, warmup 100, AdamW, no dropout, the objectives' tiny-config "
             "options (SpanBERT SBO position dim 32; ELECTRA generator 1/4 width, λ = 50). Nothing was tuned per arm. "
             "**Equal compute** here means equal steps and tokens; the train FLOPs of one step are measured "
             "(FlopCounterMode, one real forward + backward, attention on the math kernel) and shown relative to MLM: "
             "ELECTRA's include its generator and per-token discriminator head, SpanBERT's the SBO head. ELECTRA's "
             "discriminator has the MLM encoder's size, so it is compared on the probe; its generator (1/4 width) "
             "is scored separately.",
             "Held-out numbers: the run's validation split "
             f"({report['eval_blocks']} blocks), fixed masks (seed 1234): random-token MLM (15%, 80/10/10) and span "
             "infilling (whole spans of 3–6 words, all [MASK], ≈15% of tokens, every span token predicted in one "
             f"pass). Probe: WordNet supersense (45 classes), {probe.get('n_train')} train / {probe.get('n_test')} test "
             "glosses, mean-pooled last layer, standardised, logistic regression C = 1 (fixed).", "",
             "| arm | train time (tok/s) | load | train GFLOP/step (× MLM) | MLM loss | MLM acc | span token acc "
             "| exact span | supersense probe acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in [*arms, "mlm-seed1@seed0-split", "random-init"]:
        if arm not in flat:
            continue
        f = flat[arm]
        run = runs.get(arm.split("@")[0], {}) if arm != "random-init" else {}
        fl = flops.get(arm, {}).get("train_flops_per_step")
        t = f"{run['train_seconds']:.0f} s ({run['tok_per_s'] / 1e3:.1f}k)" if run and "@" not in arm else "–"
        load = f"{run.get('load1_mean', 0):.1f}" if run and "@" not in arm else "–"
        fcol = f"{fl / 1e9:.1f} ({fl / mlm_flops:.2f}×)" if fl and mlm_flops else "–"
        name = {"electra-seed0": "electra-seed0 (discriminator)",
                "mlm-seed1@seed0-split": "mlm-seed1, on seed 0's split²",
                "random-init": "random init (control)"}.get(arm, arm)
        if arm == "mlm-seed1":
            name = "mlm-seed1 (own split¹)"
        lines.append(f"| {name} | {t} | {load} | {fcol} | {fmt(f.get('mlm_loss'))} | {fmt(f.get('mlm_acc'))} | "
                     f"{fmt(f.get('span_acc'))} | {fmt(f.get('span_exact'))} | {fmt(f.get('probe_acc'))} |")
        if arm == "electra-seed0":
            lines.append(f"| electra-seed0 (generator, 1/4 width) | | | | {fmt(f['gen_mlm_loss'])} | "
                         f"{fmt(f['gen_mlm_acc'])} | {fmt(f['gen_span_acc'])} | {fmt(f['gen_span_exact'])} | "
                         f"{fmt(f['gen_probe_acc'])} |")
    uni = report["evaluations"].get("mlm-seed0", {}).get("mlm", {})
    span_uni = report["evaluations"].get("mlm-seed0", {}).get("span_infilling", {})
    lines.append(f"| unigram / majority baseline | | | | {fmt(uni.get('unigram_loss'))} | {fmt(uni.get('unigram_acc'))} "
                 f"| {fmt(span_uni.get('unigram_acc'))} | | {fmt(probe.get('majority_acc'))} |")
    plateau = report.get("plateau", {})
    if plateau:
        lines += ["", "Left the plateau? (held-out loss below the training-unigram loss of the same tokens; ELECTRA's "
                  "discriminator: BCE below the entropy of its replaced/original base rate) " + "; ".join(
                      f"{k}: {v['value']:.3f} vs {v['plateau']:.3f} ({'yes' if v['left'] else 'NO'})"
                      for k, v in plateau.items()) + "."]
    lines += ["", "Seed spread (|mlm-seed0 − mlm-seed1|, the larger of ¹ and ²): " + ", ".join(
        f"{m} {fmt(spread[m], 4)}" for m in METRICS if spread.get(m) is not None) + ". Differences to mlm-seed0 in "
        "units of that spread:", ""]
    lines += ["| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm, g in gaps.items():
        cells = []
        for m in METRICS:
            if m not in g:
                cells.append("–")
                continue
            x = g[m]["x_spread"]
            cells.append(f"{g[m]['diff']:+.4f} ({x:.1f}×)" if x is not None else f"{g[m]['diff']:+.4f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "¹ `train.seed` also draws the train/validation document split, so mlm-seed1 trained on a different "
              "98% of the documents and is scored on its own, different 2% (the spread then includes the change of "
              "evaluation set). ² The same model scored on seed 0's validation blocks, most of whose documents were "
              "in its training split (each seen at most once). The probe uses one fixed WordNet split for every arm.",
              *[x for note in report.get("notes", []) for x in ("", note)]]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) our section of RESULTS.md, keeping every other section."""
    if path.is_file():
        old = path.read_text()
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            new = head + text + ("\n" + tail if tail else "")
        else:
            new = old.rstrip() + "\n\n" + text
    else:
        new = "# Benchmark results\n\nRaw JSON of each section sits beside this file.\n\n" + text
    path.write_text(new)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--eval-blocks", type=int, default=None, help="validation blocks to score (default: all)")
    parser.add_argument("--probe-train", type=int, default=20_000)
    parser.add_argument("--probe-test", type=int, default=10_000)
    parser.add_argument("--override", nargs="*", default=[], help="extra key.sub=value overrides for every arm")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS); 1 avoids oversubscription when other jobs "
                             "share the cores (default: torch's choice)")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    parser.add_argument("--from-json", type=Path, help="re-render RESULTS.md from a raw objectives-<date>.json (no "
                                                       "training or evaluation); --note lines replace its notes")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["plateau"] = plateau_check(report, args.out)
        if args.note:
            report["notes"] = args.note
        args.from_json.write_text(json.dumps(report, indent=1) + "\n")
        text = markdown(report)
        args.results.mkdir(parents=True, exist_ok=True)
        write_section(args.results / "RESULTS.md", text)
        print(text)
        return 0
    if args.arms[0] != "mlm-seed0" and "mlm-seed0" in args.arms:
        args.arms.remove("mlm-seed0")
        args.arms.insert(0, "mlm-seed0")

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = check_same_setup(args)
    flops = {}
    for arm, cfg in configs.items():
        flops[arm] = step_flops(cfg)
        print(f"[flops {arm}] {flops[arm]['train_flops_per_step'] / 1e9:.2f} GFLOP/step", flush=True)
    if "mlm-seed1" in flops:
        flops["mlm-seed1@seed0-split"] = flops["mlm-seed1"]
    runs = {arm: train_arm(args, arm) for arm in args.arms}
    train_done = time.perf_counter()
    evaluations = evaluate_all(args, configs)
    flat = {name: pick(r) for name, r in evaluations.items()}
    spread, gaps = spread_and_gaps(flat) if "mlm-seed0" in flat else ({}, {})
    eval_blocks = evaluations.get("mlm-seed0", {}).get("data", {}).get("blocks", args.eval_blocks)
    command = "python scripts/compare_objectives.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "date": datetime.date.today().isoformat(), "command": command.strip(), "steps": args.steps,
        "arms": {arm: {"config": ARMS[arm][0], "seed": ARMS[arm][1], "overrides": arm_overrides(args, arm)}
                 for arm in args.arms},
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": "not measured",
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version()},
        "threads": args.threads or torch.get_num_threads(), "eval_blocks": eval_blocks, "runs": runs, "flops": flops, "evaluations": evaluations, "flat": flat,
        "seed_spread": spread, "gaps_vs_mlm_seed0": gaps,
        "seconds": {"training": round(train_done - started, 1), "evaluation": round(time.perf_counter() - train_done, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "probe_train": args.probe_train, "probe_test": args.probe_test, "notes": args.note,
    }
    report["plateau"] = plateau_check(report, args.out)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"objectives-{report['date']}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    write_section(args.results / "RESULTS.md", text)
    print(text)
    print(json.dumps(report["seconds"]))
    return 0

