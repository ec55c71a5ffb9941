"""BERT vs RoBERTa vs ModernBERT backbones (``model.arch``) on the demo corpus with MLM, plus SpanBERT and ELECTRA on
ModernBERT: same tokens, steps, seeds and schedule, every export scored by pretrain/evaluation.py (held-out MLM
and span infilling with fixed masks, WordNet-supersense linear probe). Issue 20 item 5.

    python scripts/compare_archs.py [--steps 1500] [--out runs/compare-archs] [--results benchmarks]

Arms (each a normal run of scripts/pretrain.py into OUT/<arm>/, resumable; a finished arm is not retrained; the
machinery is pretrain/studies/arms.py's): <arch>-seed0 and <arch>-seed1 for bert, roberta and modernbert
(configs/tiny.yaml with ``model.arch=<arch>``: the seed-to-seed spread per arch), span-modernbert-seed0
(configs/spanbert-tiny.yaml) and electra-modernbert-seed0 (configs/electra-tiny.yaml), all with the same overrides
as the objectives study (2 layers x 128, 2 heads, FFN 512, no dropout, lr 2e-3, warmup 100, batch 32 x 128; --override
adds more). Before training, the resolved configs are checked to differ only in the objective, ``model.arch``, the
arch's own section ``model.<arch>``, the seed and the output directory. Every MLM arm masks 15% (80/10/10; ModernBERT's
own recipe masks 30%), so the training losses and the held-out losses (15% masks, seed 1234) compare. ELECTRA on
ModernBERT trains ``ModernBertForMaskedLM`` (1/4 width, its own embeddings) with a one-label
``ModernBertForTokenClassification`` discriminator, whose base encoder is probed.

Equal compute means equal steps and tokens: the parameters and the measured train FLOPs of one step (FlopCounterMode,
one real forward + backward, attention on the math kernel) are reported beside each arm's numbers, since the archs
differ in both at the same widths (ModernBERT's GeGLU has two input projections, no biases, no position table).

Writes the "## Backbones (BERT vs RoBERTa vs ModernBERT)" section of RESULTS/RESULTS.md (other sections are kept) and
the raw numbers into RESULTS/archs-<date>.json.
"""

from __future__ import annotations

from objectives import BACKBONES

from .arms import Arm, Study, fmt, parse_args, pick, threads_text
from .arms import main as run_study

ARCHS = ("bert", "roberta", "modernbert")
#: arm -> (arch, objective, seed); the order is the training order (the second seeds last)
LABELS = {**{f"{a}-seed0": (a, "mlm", 0) for a in ARCHS}, "span-modernbert-seed0": ("modernbert", "span", 0),
          "electra-modernbert-seed0": ("modernbert", "electra", 0), **{f"{a}-seed1": (a, "mlm", 1) for a in ARCHS}}
CONFIGS = {"mlm": "configs/tiny.yaml", "span": "configs/spanbert-tiny.yaml", "electra": "configs/electra-tiny.yaml"}

STUDY = Study(
    name="archs", script="compare_archs", runs="runs/compare-archs",
    section="## Backbones (BERT vs RoBERTa vs ModernBERT)",
    arms={arm: Arm(CONFIGS[objective], seed, (f"model.arch={arch}",))
          for arm, (arch, objective, seed) in LABELS.items()},
    varies=("objective", "model.arch", *(f"model.{a}" for a in ARCHS if BACKBONES[a].options)))
#: each arm's numbers are compared with this arm's, in units of the larger seed spread of the two archs
COMPARED_WITH = {"roberta-seed0": "bert-seed0", "modernbert-seed0": "bert-seed0",
                 "span-modernbert-seed0": "modernbert-seed0", "electra-modernbert-seed0": "modernbert-seed0"}
METRICS = ("mlm_loss", "mlm_acc", "span_acc", "probe_acc")


def plan(args, configs: dict) -> list[tuple]:
    """Every arm on its own validation split, and each arch's random-init control (its seed-0 export's config)."""
    out = [(arm, args.out / arm / "export", args.out / arm / "config.yaml", {}) for arm in configs]
    out += [(f"random-init-{a}", args.out / f"{a}-seed0" / "export", args.out / f"{a}-seed0" / "config.yaml",
             {"random_init": True}) for a in ARCHS if f"{a}-seed0" in configs]
    return out


def seed_spread(flat: dict) -> dict:
    """Per arch with both seeds: each metric's two values, their mean and spread |seed 0 - seed 1|."""
    out = {}
    for arch in ARCHS:
        pair = flat.get(f"{arch}-seed0"), flat.get(f"{arch}-seed1")
        if None in pair:
            continue
        out[arch] = {m: {"values": [p[m] for p in pair], "mean": (pair[0][m] + pair[1][m]) / 2,
                         "spread": abs(pair[0][m] - pair[1][m])} for m in METRICS}
    return out


def gaps(flat: dict, spread: dict) -> dict:
    """Each arm of ``COMPARED_WITH`` minus its reference, and that difference over the larger seed spread of the
    two archs (None where a spread is missing or zero)."""
    out = {}
    for arm, ref in COMPARED_WITH.items():
        if arm not in flat or ref not in flat:
            continue
        out[arm] = {"vs": ref}
        for m in METRICS:
            a, b = flat[arm].get(m), flat[ref].get(m)
            if a is None or b is None:
                continue
            compared = {LABELS[arm][0], LABELS[ref][0]}
            unit = max(spread[a][m]["spread"] for a in compared) if compared <= set(spread) else None
            out[arm][m] = {"diff": a - b, "x_spread": abs(a - b) / unit if unit else None}
    return out


def finish(report: dict, args) -> None:
    report["flat"] = flat = {name: pick(r) for name, r in report["evaluations"].items()}
    report["seed_spread"] = seed_spread(flat)
    report["gaps"] = gaps(flat, report["seed_spread"])


def parameters(report: dict, arm: str) -> tuple[int, int | None]:
    """(every trained parameter: model(s) and objective heads, the encoder's that the probe reads)."""
    total = sum(report["flops"][arm]["parameters"].values())
    result = report["evaluations"].get(arm, {})
    result = result.get("discriminator", result)
    return total, result.get("encoder_parameters")


def markdown(report: dict) -> str:
    """The RESULTS.md section, from the raw report alone (so ``--from-json`` can re-render it)."""
    flat, flops, runs, steps, host = report["flat"], report["flops"], report["runs"], report["steps"], report["host"]
    ref_flops = flops.get("bert-seed0", {}).get("train_flops_per_step")
    probe = next((r["probe"] for r in report["evaluations"].values() if "probe" in r), {})
    lines = [STUDY.section, "",
             f"Measured {report['date']} on **{host['cpu']} ({host['cores']} cores), CPU only** (GPU: not measured); "
             f"torch {host['torch']}, transformers {host['transformers']}, {threads_text(report)}. "
             "Other jobs may share the machine: the load column is the mean 1-minute load average during each "
             "run. Command:", "", "```bash", report["command"], "```", "",
             "Every arm: demo corpus (bible + pydoc + gcide; WordNet glosses are not in it), WordPiece 8192, blocks "
             f"of 128, **{steps} steps × 32 blocks = {steps * 32 * 128 / 1e6:.1f}M tokens**, 2 layers × 128 (2 "
             "heads, FFN 512), lr 2e-3 linear decay, warmup 100, AdamW, no dropout, 15% masking (ModernBERT's "
             "recipe masks 30%: not here, so the losses compare), ModernBERT's own options at their defaults "
             "(global attention every 3rd layer from layer 0, a 128-token local window, RoPE θ 160k global / 10k "
             "local). Only the arch (and for the last two arms the objective) differs; nothing was tuned per arm. "
             "Parameters: everything trained (the encoder that the probe reads in brackets); train FLOPs of one "
             "step measured (FlopCounterMode, one real forward + backward, attention on the math kernel), relative "
             "to BERT's.",
             "Held-out numbers: each run's validation split "
             f"({report['eval_blocks']} blocks; `train.seed` draws the split, so the seed-1 arms are scored on their "
             "own), fixed masks (seed 1234): random-token MLM (15%, 80/10/10) and span infilling (whole spans of 3–6 "
             f"words, all [MASK]). Probe: WordNet supersense (45 classes), {probe.get('n_train')} train / "
             f"{probe.get('n_test')} test glosses, mean-pooled last layer, standardised, logistic regression C = 1.",
             "",
             "| arm | arch | objective | parameters (encoder) | train GFLOP/step (× BERT) | train time (tok/s) | load "
             "| MLM loss | MLM acc | span token acc | supersense probe acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in flat.items():
        if name.startswith("random-init-"):
            arch, objective = name.removeprefix("random-init-"), "– (random init)"
            params, time_col, load, fcol = parameters(report, f"{arch}-seed0"), "–", "–", "–"
        else:
            (arch, objective, _), run, fl = LABELS[name], runs[name], flops[name]["train_flops_per_step"]
            params = parameters(report, name)
            time_col = f"{run['train_seconds']:.0f} s ({run['tok_per_s'] / 1e3:.1f}k)"
            load = f"{run.get('load1_mean', 0):.1f}"
            fcol = f"{fl / 1e9:.1f} ({fl / ref_flops:.2f}×)" if ref_flops else f"{fl / 1e9:.1f}"
        pcol = f"{params[0] / 1e6:.2f}M ({params[1] / 1e6:.2f}M)" if params[1] else f"{params[0] / 1e6:.2f}M"
        label = f"{name} (discriminator)" if objective == "electra" else name
        lines.append(f"| {label} | {arch} | {objective} | {pcol} | {fcol} | {time_col} | {load} | "
                     f"{fmt(f.get('mlm_loss'))} | {fmt(f.get('mlm_acc'))} | {fmt(f.get('span_acc'))} | "
                     f"{fmt(f.get('probe_acc'))} |")
        if objective == "electra":
            lines.append(f"| {name} (generator, 1/4 width) | | | | | | | {fmt(f['gen_mlm_loss'])} | "
                         f"{fmt(f['gen_mlm_acc'])} | {fmt(f['gen_span_acc'])} | {fmt(f['gen_probe_acc'])} |")
    uni = next((r["mlm"] for r in report["evaluations"].values() if "unigram_loss" in r.get("mlm", {})), {})
    lines.append(f"| unigram / majority baseline | | | | | | | {fmt(uni.get('unigram_loss'))} | "
                 f"{fmt(uni.get('unigram_acc'))} | | {fmt(probe.get('majority_acc'))} |")
    for arm, reason in report.get("unsupported", {}).items():
        lines += ["", f"**{arm}: not yet supported** (its config is rejected: {reason})."]
    spread = report["seed_spread"]
    if spread:
        lines += ["", "Per arch over the two seeds: mean (seed 0 / seed 1; spread = |seed 0 − seed 1|).", "",
                  "| arch | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for arch, s in spread.items():
            lines.append(f"| {arch} | " + " | ".join(
                f"{s[m]['mean']:.4f} ({s[m]['values'][0]:.4f} / {s[m]['values'][1]:.4f}; {s[m]['spread']:.4f})"
                for m in METRICS) + " |")
    if report["gaps"]:
        lines += ["", "Differences (seed 0) in units of the larger seed spread of the two archs compared:", "",
                  "| arm | vs | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for arm, g in report["gaps"].items():
            cells = [("–" if m not in g else f"{g[m]['diff']:+.4f}" + (
                f" ({g[m]['x_spread']:.1f}×)" if g[m]["x_spread"] is not None else "")) for m in METRICS]
            lines.append(f"| {arm} | {g['vs']} | " + " | ".join(cells) + " |")
    lines += [x for note in report.get("notes", []) for x in ("", note)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    return run_study(STUDY, parse_args(STUDY, __doc__, argv), plan, finish, markdown)
