"""What the comparison studies share (``objectives``: MLM vs SpanBERT vs ELECTRA; ``archs``: BERT vs RoBERTa vs
ModernBERT): a study is a table of arms, each a real run of scripts/pretrain.py (a config, a seed, extra overrides)
into OUT/<arm>/ (resumable; a finished arm is not retrained), on settings checked to be the same for every arm but
the study's own allowed differences; the train FLOPs of one step and the parameters of each arm are measured; the
exports are scored by pretrain/evaluation.py; the report goes into RESULTS/<study name>-<date>.json and the study's
section of RESULTS/RESULTS.md (other sections are kept).

A study module defines its :class:`Study`, the evaluations it wants (:func:`evaluate`), the numbers it derives
from them (a ``finish(report)`` function, rerun by ``--from-json``) and its section (a ``markdown(report)``
function), and hands them to :func:`main`.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

#: the settings of both CPU studies: 2 layers x 128 (leaves the unigram plateau well within a CPU budget), no
#: dropout, one lr and schedule for every arm
CPU_COMMON = ("model.num_layers=2", "train.lr=2e-3", "train.warmup_steps=100", "model.hidden_dropout=0",
              "model.attention_dropout=0", "train.micro_batch_size=32", "train.grad_accum=1", "train.eval_every=0",
              "train.log_every=100", "log.tensorboard=false")


@dataclass(frozen=True)
class Arm:
    """One run of a study."""

    config: str
    """Config file, relative to the repository root."""
    seed: int
    """``train.seed`` (it also draws the train/validation document split)."""
    overrides: tuple[str, ...] = ()
    """This arm's own ``key.sub=value`` overrides (applied after the study's common ones)."""


@dataclass(frozen=True)
class Study:
    name: str
    """Prefix of the raw JSON (RESULTS/<name>-<date>.json)."""
    script: str
    """Its script in scripts/ (without .py), for the report's command line."""
    runs: str
    """Default ``--out``: where the arms' run directories go, relative to the repository root."""
    section: str
    """The RESULTS.md heading this study owns (``## ...``)."""
    arms: dict[str, Arm]
    """arm name -> arm; the first is the reference that every other arm is checked and compared against, and the
    order is the training order."""
    varies: tuple[str, ...]
    """Dotted config keys (or whole sections) the arms may differ in, besides ``output_dir`` and ``train.seed``."""
    common: tuple[str, ...] = CPU_COMMON
    """Overrides of every arm (before its own)."""
    optional: frozenset[str] = field(default_factory=frozenset)
    """Arms whose config the toolkit may reject (an objective that does not train that arch yet): listed in the
    report as not yet supported, with the reason, instead of failing the study."""


def arm_overrides(study: Study, args, arm: str) -> list[str]:
    spec = study.arms[arm]
    return [*study.common, f"train.max_steps={args.steps}", f"train.save_every={args.steps}",
            f"train.seed={spec.seed}", *spec.overrides, f"output_dir={args.out / arm}", *args.override]


def load_arm_configs(study: Study, args) -> tuple[dict, dict[str, str]]:
    """Resolved configs of ``args.arms`` and, for the optional arms whose config is rejected, arm -> the reason."""
    from pretrain.config import ConfigError, load_config

    configs, unsupported = {}, {}
    for arm in args.arms:
        try:
            configs[arm] = load_config(ROOT / study.arms[arm].config, arm_overrides(study, args, arm))
        except ConfigError as e:
            if arm not in study.optional:
                raise
            unsupported[arm] = " ".join(str(e).split())  # one line: it goes into a sentence of the report
    return configs, unsupported


def check_same_setup(study: Study, configs: dict) -> None:
    """The resolved configs must differ only in ``study.varies``, the seed and output_dir."""
    from pretrain.config import config_differences, config_to_dict

    def comparable(cfg):
        d = config_to_dict(cfg)
        for key in ("output_dir", "train.seed", *study.varies):
            *parents, last = key.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(last, None)
        return d

    ref = next(iter(configs))
    for arm, cfg in configs.items():
        diffs = config_differences(comparable(configs[ref]), comparable(cfg))
        if diffs:
            raise SystemExit(f"{arm} differs from {ref} beyond {', '.join(study.varies)}/seed/output_dir: {diffs}")


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


def train_arm(study: Study, args, arm: str) -> dict:
    """Run the CLI for one arm (or reuse a finished run) and return its timing record."""
    out = args.out / arm
    record_path = out / "compare_run.json"
    if record_path.is_file() and (out / "export").is_dir():
        record = json.loads(record_path.read_text())
        if record.get("steps") == args.steps:
            print(f"[{arm}] finished before: reusing {out}", flush=True)
            return record
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), str(ROOT / study.arms[arm].config),
           *arm_overrides(study, args, arm)]
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
    counted by FlopCounterMode with SDPA on the math kernel (so attention matmuls are counted on the CPU), and the
    parameters of the model (ELECTRA: of each network) and of the objective's own heads."""
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


def evaluate(args, plan: list[tuple]) -> dict:
    """Score each ``(name, export_dir, run_config, EvalOptions overrides)`` of ``plan`` with ``evaluate_export``
    (held-out blocks and the probe split loaded once and shared); ``--probe-data`` replaces the WordNet task."""
    import transformers

    from pretrain.evaluation import EvalOptions, evaluate_export, read_labelled

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    options = EvalOptions(probe_train=args.probe_train, probe_test=args.probe_test)
    probe_examples = read_labelled(args.probe_data) if args.probe_data else None
    shared: dict = {}
    results = {}
    for name, export, config, kw in plan:
        start = time.perf_counter()
        opts = EvalOptions(**{**options.__dict__, **kw}) if kw else options
        results[name] = evaluate_export(export, opts, config=config, max_blocks=args.eval_blocks,
                                        probe_examples=probe_examples, _shared=shared)
        print(f"[eval {name}] {time.perf_counter() - start:.0f}s", flush=True)
    return results


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


def threads_text(report: dict) -> str:
    """How the arms shared the CPU, for a section's first paragraph."""
    jobs = report.get("jobs", 1)
    return f"{report['threads']} torch thread(s) per run" + (f", {jobs} runs at a time" if jobs > 1 else "")


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def write_section(path: Path, section: str, text: str) -> None:
    """Replace (or append) the section ``section`` of RESULTS.md, keeping every other section."""
    if path.is_file():
        old = path.read_text()
        if section in old:
            head, rest = old.split(section, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            new = head + text + ("\n" + tail if tail else "")
        else:
            new = old.rstrip() + "\n\n" + text
    else:
        new = "# Benchmark results\n\nRaw JSON of each section sits beside this file.\n\n" + text
    path.write_text(new)


def parse_args(study: Study, doc: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--arms", nargs="+", default=list(study.arms), choices=list(study.arms))
    parser.add_argument("--out", type=Path, default=ROOT / study.runs)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--eval-blocks", type=int, default=None, help="validation blocks to score (default: all)")
    parser.add_argument("--probe-train", type=int, default=20_000)
    parser.add_argument("--probe-test", type=int, default=10_000)
    parser.add_argument("--probe-data", type=Path, default=None,
                        help="JSONL of {\"text\", \"label\"} to probe instead of the WordNet supersenses")
    parser.add_argument("--override", nargs="*", default=[], help="extra key.sub=value overrides for every arm")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS); 1 avoids oversubscription when other jobs "
                             "share the cores (default: torch's choice)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="arms trained at once, each its own process of --threads threads (2 x 1 thread fills 2 "
                             "cores); the evaluation then runs with jobs x threads threads")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    parser.add_argument("--from-json", type=Path, help=f"re-render RESULTS.md from a raw {study.name}-<date>.json "
                                                       "(no training or evaluation); --note lines replace its notes")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report's command line
    reference = next(iter(study.arms))
    if reference in args.arms:  # the reference arm first: the others are checked and compared against it
        args.arms = [reference, *(a for a in args.arms if a != reference)]
    return args


def main(study: Study, args, plan: Callable, finish: Callable, markdown: Callable) -> int:
    """Run ``study``: check the setup, measure FLOPs, train the arms, evaluate ``plan(args, configs)``, derive
    ``finish(report, args)``, write the JSON and the section ``markdown(report)``. ``--from-json`` only reruns
    ``finish`` and ``markdown`` on a saved report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        if args.note:
            report["notes"] = args.note
        finish(report, args)
        args.from_json.write_text(json.dumps(report, indent=1) + "\n")
        return _write(study, args, report, markdown)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    configs, unsupported = load_arm_configs(study, args)
    for arm, reason in unsupported.items():
        print(f"[{arm}] not supported: {reason}", flush=True)
    if not configs:
        raise SystemExit(f"no arm to train: {', '.join(unsupported)} not supported")
    check_same_setup(study, configs)
    flops = {}
    for arm, cfg in configs.items():
        flops[arm] = step_flops(cfg)
        print(f"[flops {arm}] {flops[arm]['train_flops_per_step'] / 1e9:.2f} GFLOP/step", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each arm is a subprocess: threads only wait on them
        runs = dict(zip(configs, pool.map(lambda arm: train_arm(study, args, arm), configs)))
    train_done = time.perf_counter()
    if args.threads and args.jobs > 1:
        torch.set_num_threads(args.threads * args.jobs)
    evaluations = evaluate(args, plan(args, configs))
    report = {
        "date": datetime.date.today().isoformat(), "steps": args.steps,
        "command": f"python scripts/{study.script}.py {' '.join(args.argv)}".strip(),
        "arms": {arm: {"config": study.arms[arm].config, "seed": study.arms[arm].seed,
                       "overrides": arm_overrides(study, args, arm)} for arm in configs},
        "unsupported": unsupported,
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": "not measured", "torch": torch.__version__,
                 "transformers": transformers.__version__, "python": platform.python_version()},
        "threads": args.threads or torch.get_num_threads(), "jobs": args.jobs, "runs": runs, "flops": flops,
        "evaluations": evaluations, "probe_train": args.probe_train, "probe_test": args.probe_test,
        "seconds": {"training": round(train_done - started, 1),
                    "evaluation": round(time.perf_counter() - train_done, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "notes": args.note,
    }
    report["eval_blocks"] = next((r["data"]["blocks"] for r in evaluations.values() if "data" in r), args.eval_blocks)
    finish(report, args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{study.name}-{report['date']}.json").write_text(json.dumps(report, indent=1) + "\n")
    _write(study, args, report, markdown)
    print(json.dumps(report["seconds"]))
    return 0


def _write(study: Study, args, report: dict, markdown: Callable) -> int:
    text = markdown(report)
    args.results.mkdir(parents=True, exist_ok=True)
    write_section(args.results / "RESULTS.md", study.section, text)
    print(text)
    return 0
