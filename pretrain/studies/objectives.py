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
are kept) and the raw numbers into RESULTS/objectives-<date>.json. The machinery (arms, setup check, FLOPs, training,
evaluation, report) is pretrain/studies/arms.py's; this module holds the study's arms, evaluations and section.
"""

from __future__ import annotations

from pathlib import Path

from .arms import Arm, Study, fmt, parse_args, pick, read_metrics, threads_text
from .arms import main as run_study

STUDY = Study(
    name="objectives", script="compare_objectives", runs="runs/compare",
    section="## Objectives (MLM vs SpanBERT vs ELECTRA)",
    # the order is the training order (the second MLM seed last)
    arms={"mlm-seed0": Arm("configs/tiny.yaml", 0), "span-seed0": Arm("configs/spanbert-tiny.yaml", 0),
          "electra-seed0": Arm("configs/electra-tiny.yaml", 0), "mlm-seed1": Arm("configs/tiny.yaml", 1)},
    varies=("objective",))


def plan(args, configs: dict) -> list[tuple]:
    """Every arm on its own validation split; mlm-seed1 also on seed 0's; the random-init control."""
    out = [(arm, args.out / arm / "export", args.out / arm / "config.yaml", {}) for arm in configs]
    if "mlm-seed1" in configs and "mlm-seed0" in configs:
        # train.seed also picks the train/validation document split: mlm-seed1 is scored above on its own validation
        # split; here on seed 0's (the split every seed-0 arm is scored on), most of whose documents it trained on
        out.append(("mlm-seed1@seed0-split", args.out / "mlm-seed1" / "export",
                    args.out / "mlm-seed0" / "config.yaml", {}))
    if "mlm-seed0" in configs:
        out.append(("random-init", args.out / "mlm-seed0" / "export", args.out / "mlm-seed0" / "config.yaml",
                    {"random_init": True}))
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
    lines = [STUDY.section, "",
             f"Measured {report['date']} on **{host['cpu']} ({host['cores']} cores), CPU only** (GPU: not measured); "
             f"torch {host['torch']}, transformers {host['transformers']}, {threads_text(report)}. "
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


def finish(report: dict, args) -> None:
    """The flat numbers, the MLM seed spread, every arm's gap to mlm-seed0 and the plateau checks."""
    if "mlm-seed1" in report["flops"]:
        report["flops"]["mlm-seed1@seed0-split"] = report["flops"]["mlm-seed1"]
    report["flat"] = flat = {name: pick(r) for name, r in report["evaluations"].items()}
    report["seed_spread"], report["gaps_vs_mlm_seed0"] = spread_and_gaps(flat) if "mlm-seed0" in flat else ({}, {})
    report["plateau"] = plateau_check(report, args.out)


def main(argv=None) -> int:
    return run_study(STUDY, parse_args(STUDY, __doc__, argv), plan, finish, markdown)
