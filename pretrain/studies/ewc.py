"""EWC continued pretraining on two domains of the demo corpus: does EWC keep more of the first domain?

Protocol (fixed before any arm was run):
  1. start model: MLM on scripture (``demo: [bible]``), 2 layers x 128 (2 heads, FFN 512), no dropout, blocks of 128,
     batch 32, ``--start-steps`` steps, lr 1e-3 (warmup 10%, linear decay). The WordPiece vocabulary (8192) is
     trained on bible + pydoc, a general vocabulary fixed for both stages, so that forgetting is not confounded with
     pydoc words falling apart into pieces of a scripture-only vocabulary.
  2. arms: continue on technical docs (``demo: [pydoc]``) from the start model's export for ``--steps`` steps (same
     lr schedule, fresh AdamW, same seed) with train.ewc.lambda in {0 (plain continued pretraining), 10, 100, 1000}.
     The grid spans the scale where the penalty is comparable to the loss it protects: for a per-block Fisher
     (mean loss over the m ≈ 19 masked tokens of a block) the quadratic approximation of the bible loss increase is
     about (m/2)·Σ F Δ², i.e. λ ≈ 20; the grid covers ≈ 0.5x, 5x and 50x that. Fisher: 8 x 32 = 256 bible training
     blocks of the start run's split, per-block squared gradients.
  3. held-out MLM loss/accuracy on BOTH domains (the start run's bible validation split and the pydoc validation
     split of the arms' runs, the same blocks for every arm of a seed; fixed masks, seed 1234) for the start model
     and every arm; all seeds in ``--seeds`` (a seed also draws its document split, so compare arms within a seed).

Writes ``--out``.json (everything) and ``--out``.md (the tables). Runs resume: an arm whose export exists is reused.

    OMP_NUM_THREADS=1 python scripts/compare_ewc.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

from .arms import cpu_name

LAMBDAS = (0.0, 10.0, 100.0, 1000.0)


def run_config(out: Path, demo: list[str], seed: int, steps: int, tokenizer_path: str | None, ewc: dict) -> dict:
    return {
        "output_dir": str(out),
        "data": {"demo": demo, "block_size": 128, "validation_fraction": 0.02, "num_workers": 0},
        "tokenizer": {"path": tokenizer_path},
        "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 512,
                  "max_position_embeddings": 128, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "objective": {"name": "mlm"},
        "train": {"seed": seed, "micro_batch_size": 32, "max_steps": steps, "lr": 1e-3,
                  "warmup_steps": max(1, steps // 10), "schedule": "linear", "eval_every": 0, "eval_batches": 16,
                  "save_every": steps, "keep_last": 1, "log_every": 20, "device": "cpu", "ewc": ewc},
        "log": {"tensorboard": False},
    }


def train(cfg_dict: dict) -> dict:
    """fit() unless the run's export exists; returns wall time, tokens and the last train record."""
    from pretrain.config import config_from_dict
    from pretrain.trainer import fit

    out = Path(cfg_dict["output_dir"])
    summary_path = out / "compare_ewc_run.json"
    if (out / "export").is_dir() and summary_path.is_file():
        print(f"reusing {out}", flush=True)
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    fit(config_from_dict(cfg_dict))
    wall = time.perf_counter() - start
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "train"][-1]
    summary = {"wall_s": round(wall, 1), "tokens": last["tokens"], "steps": last["step"],
               "ewc_penalty": last.get("ewc_penalty"), "train_mlm_loss": last["mlm_loss"],
               "load_1min": os.getloadavg()[0]}
    summary_path.write_text(json.dumps(summary))
    return summary


def evaluate(export: Path, held_outs: dict) -> tuple[dict, dict]:
    """(masked_lm metrics per domain, per-block sums per domain for the paired comparisons)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pretrain.evaluation import masked_lm

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForMaskedLM.from_pretrained(str(export)).eval()
    metrics = {domain: masked_lm(model, tokenizer, held_out) for domain, held_out in held_outs.items()}
    return metrics, {domain: per_block(model, tokenizer, held_out) for domain, held_out in held_outs.items()}


def per_block(model, tokenizer, held_out, batch_size: int = 32) -> dict:
    """Per held-out block: summed masked-token loss, correct predictions and masked count [N], under the same
    masks as ``masked_lm`` (the training collator seeded with EVAL_SEED and the block index)."""
    import numpy as np
    import torch

    from objectives import get_objective
    from pretrain.evaluation import EVAL_SEED, score_masked

    mlm = get_objective("mlm", tokenizer, seed=EVAL_SEED)
    parts: dict[str, list] = {"loss": [], "correct": [], "n": []}
    with torch.no_grad():
        for start in range(0, len(held_out.examples), batch_size):
            batch = mlm.collate(held_out.examples[start:start + batch_size])
            loss, correct, selected = score_masked(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            parts["loss"].append(loss.double().sum(1).numpy())
            parts["correct"].append(correct.sum(1).numpy())
            parts["n"].append(selected.sum(1).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}


def paired(base: dict, other: dict, key: str) -> dict:
    """Token-weighted mean of other − base (``key`` = loss or correct, per masked token) with its standard error
    over blocks (a ratio estimate; paired because both models saw the same blocks and masks)."""
    if not (base["n"] == other["n"]).all():
        raise ValueError("paired comparison needs the same masks")
    d, n = other[key] - base[key], base["n"]
    mean = d.sum() / n.sum()
    se = (len(d) / (len(d) - 1) * ((d - mean * n) ** 2).sum()) ** 0.5 / n.sum()
    return {"diff": float(mean), "se": float(se)}


def markdown(results: dict) -> str:
    rows = ["| seed | arm | λ | bible loss | bible acc | pydoc loss | pydoc acc | bible acc lost | pydoc acc gained "
            "| final ewc_penalty | train wall |", "|" + "---|" * 11]
    for seed, r in results["seeds"].items():
        start = r["start"]["eval"]
        rows.append(f"| {seed} | start (bible {r['start']['train']['steps']} steps) | – | "
                    f"{start['bible']['loss']:.3f} | {start['bible']['acc']:.4f} | {start['pydoc']['loss']:.3f} | "
                    f"{start['pydoc']['acc']:.4f} | – | – | – | {r['start']['train']['wall_s']:.0f} s |")
        for arm in r["arms"]:
            e, t = arm["eval"], arm["train"]
            pen = "–" if t["ewc_penalty"] is None else f"{t['ewc_penalty']:.4f}"
            rows.append(f"| {seed} | pydoc {t['steps']} steps | {arm['lambda']:g} | {e['bible']['loss']:.3f} | "
                        f"{e['bible']['acc']:.4f} | {e['pydoc']['loss']:.3f} | {e['pydoc']['acc']:.4f} | "
                        f"{arm['bible_acc_lost']:+.4f} | {arm['pydoc_acc_gained']:+.4f} | {pen} | "
                        f"{t['wall_s']:.0f} s |")
    rows += ["", "Paired differences on the same held-out blocks and masks (arm − reference, per masked token; ± one "
             "standard error over blocks):", "",
             "| seed | λ | bible loss vs λ=0 | bible acc vs λ=0 | pydoc loss vs λ=0 | pydoc acc vs λ=0 "
             "| bible loss vs start | pydoc loss vs start |", "|" + "---|" * 8]
    for seed, r in results["seeds"].items():
        for arm in r["arms"]:
            pr = arm["paired"]
            cells = [f"{pr[k]['diff']:+.4f} ± {pr[k]['se']:.4f}" for k in (
                "bible_loss_vs_lambda0", "bible_acc_vs_lambda0", "pydoc_loss_vs_lambda0", "pydoc_acc_vs_lambda0",
                "bible_loss_vs_start", "pydoc_loss_vs_start")]
            rows.append(f"| {seed} | {arm['lambda']:g} | " + " | ".join(cells) + " |")
    summary = ["", "Mean over seeds (per λ; ± half the range of the seeds, i.e. |s0 − s1|/2 for two seeds):", "",
               "| λ | bible acc lost | pydoc acc gained | bible loss − start | pydoc loss − start |",
               "|---|---|---|---|---|"]
    for lam, s in results["by_lambda"].items():
        summary.append(f"| {lam} | " + " | ".join(f"{s[k]['mean']:+.4f} ± {s[k]['half_range']:.4f}" for k in
                                                   ("bible_acc_lost", "pydoc_acc_gained", "bible_loss_delta",
                                                    "pydoc_loss_delta")) + " |")
    return "\n".join(rows + summary) + "\n"


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--start-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--fisher-batches", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks per domain (at most)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="runs/ewc-compare")
    parser.add_argument("--out", default=f"benchmarks/ewc-{datetime.date.today()}")
    args = parser.parse_args(argv)
    if args.lambdas[0] != 0:
        parser.error("the first of --lambdas must be 0: plain continued pretraining is the reference arm")

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from pretrain.config import DataConfig, TokenizerConfig
    from pretrain.data import get_tokenizer
    from pretrain.evaluation import load_held_out

    began = time.perf_counter()
    joint = get_tokenizer(TokenizerConfig(vocab_size=8192), DataConfig(demo=["bible", "pydoc"]))
    tokenizer_path = joint.name_or_path
    runs = Path(args.runs)
    results: dict = {"seeds": {}}
    for seed in args.seeds:
        start_dir = runs / f"seed{seed}" / "start-bible"
        start = {"train": train(run_config(start_dir, ["bible"], seed, args.start_steps, tokenizer_path, {}))}
        arms = []
        for lam in args.lambdas:
            ewc = {"lambda": lam, "source": str(start_dir / "export"), "fisher_batches": args.fisher_batches}
            arm_dir = runs / f"seed{seed}" / f"pydoc-lambda{lam:g}"
            arms.append({"lambda": lam, "dir": str(arm_dir),
                         "train": train(run_config(arm_dir, ["pydoc"], seed, args.steps, None, ewc))})
        tok = AutoTokenizer.from_pretrained(str(start_dir / "export"))
        held_outs = {"bible": load_held_out(tok, config=start_dir / "config.yaml", max_blocks=args.eval_blocks),
                     "pydoc": load_held_out(tok, config=Path(arms[0]["dir"]) / "config.yaml",
                                            max_blocks=args.eval_blocks)}
        eval_began = time.perf_counter()
        start["eval"], start_blocks = evaluate(start_dir / "export", held_outs)
        base_blocks = None
        for arm in arms:
            arm["eval"], blocks = evaluate(Path(arm["dir"]) / "export", held_outs)
            if base_blocks is None:  # the first arm is λ = 0
                base_blocks = blocks
            arm["paired"] = {f"{d}_{m}_vs_{ref}": paired(ref_blocks[d], blocks[d], key)
                             for ref, ref_blocks in (("start", start_blocks), ("lambda0", base_blocks))
                             for d in held_outs for m, key in (("loss", "loss"), ("acc", "correct"))}
            arm["bible_acc_lost"] = start["eval"]["bible"]["acc"] - arm["eval"]["bible"]["acc"]
            arm["pydoc_acc_gained"] = arm["eval"]["pydoc"]["acc"] - start["eval"]["pydoc"]["acc"]
            arm["bible_loss_delta"] = arm["eval"]["bible"]["loss"] - start["eval"]["bible"]["loss"]
            arm["pydoc_loss_delta"] = arm["eval"]["pydoc"]["loss"] - start["eval"]["pydoc"]["loss"]
        results["seeds"][str(seed)] = {"start": start, "arms": arms, "eval_wall_s": time.perf_counter() - eval_began,
                                       "held_out": {d: h.info for d, h in held_outs.items()}}
        print(json.dumps({"seed": seed, "start": {d: start["eval"][d]["acc"] for d in held_outs},
                          "arms": {a["lambda"]: {d: a["eval"][d]["acc"] for d in held_outs} for a in arms}}),
              flush=True)

    keys = ("bible_acc_lost", "pydoc_acc_gained", "bible_loss_delta", "pydoc_loss_delta")
    results["by_lambda"] = {}
    for i, lam in enumerate(args.lambdas):
        values = {k: [r["arms"][i][k] for r in results["seeds"].values()] for k in keys}
        results["by_lambda"][f"{lam:g}"] = {k: {"mean": statistics.fmean(v), "half_range": (max(v) - min(v)) / 2,
                                               "values": v} for k, v in values.items()}
    import transformers

    results["setup"] = {
        "command": "OMP_NUM_THREADS=1 python scripts/compare_ewc.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only (shared with other jobs)",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
        "date": str(datetime.date.today()), "tokenizer": tokenizer_path,
        "start_tokens": args.start_steps * 32 * 128, "arm_tokens": args.steps * 32 * 128,
        "wall_s_this_invocation": round(time.perf_counter() - began, 1),
        "train_wall_s_sum": round(sum(r["start"]["train"]["wall_s"] + sum(a["train"]["wall_s"] for a in r["arms"])
                                      for r in results["seeds"].values()), 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wall time {results['setup']['wall_s_this_invocation']:.0f} s (training, summed over runs: "
          f"{results['setup']['train_wall_s_sum']:.0f} s); wrote {out}.json and {out}.md")

