"""Benchmarks. Each suite prints one JSON line per configuration and writes them to benchmarks/<suite>-<date>.json
(under the working directory).

    python scripts/benchmark.py decouple [--chunks 2 4] [--steps 30] ...
    python scripts/benchmark.py step --preset bert-base --seq 128 --batch 256 --objective mlm ...

Suites (subcommands):

* ``e2e``: DESIGN.md §6. The whole trainer (``fit`` on a synthetic Zipf-law corpus: DataLoader workers masking,
  the loop, metrics) against its own step strategy on pre-collated batches of the same blocks, in one process; ``ratio``
  = end-to-end tok/s over pure-step tok/s (target >= 0.95).
* ``step``: DESIGN.md §6. One optimizer step of the stock ``transformers`` recipe a user would write (the
  baseline: the ``--arch``'s stock ``*ForMaskedLM(labels=...)`` (``BertForMaskedLM``, ``RobertaForMaskedLM``,
  ``ModernBertForMaskedLM``; MLM and SpanBERT) / ``ElectraForMaskedLM`` + ``ElectraForPreTraining`` with
  full-vocabulary logits, SDPA, AdamW (fused on CUDA), clip 1.0, bf16 autocast on CUDA, ``torch.compile`` with
  ``--compile``) against the trainer's own step (``BackpropStep``: the objective's sparse heads, token-exact
  accumulation, clipping, the finite check, the same optimizer) on the same model shape, batch and precision, in
  one or more variants (``--ours``, each its own arm on
  its own copy of the weights: ``eager``, ``fused``, ``compiled+mask``, ``compiled``, ``fast`` = ``model.fast``;
  see ``OUR_VARIANTS``; default ``fast`` on CUDA, ``eager`` on CPU), so one run ablates the fast path's levers.
  All arms run in one process, round-robin, on random-token batches masked off the clock; warm-up steps are
  excluded; CUDA is synchronised around the timed steps; the step time is the median over ``--repeat`` rounds.
  Each row: device, versions, tok/s, step ms, MFU (see ``pretrain.metrics.train_flops_per_token``: 6·N +
  12·layers·hidden·seq FLOPs per token, N the non-embedding parameters of the encoder(s); null on CPUs), the arm's
  own peak memory (CUDA only: its parameters and optimizer state plus the peak its steps allocate on top, so the
  other arms' weights do not count; null on CPU), ``peak_mem_ratio`` to the baseline's and ``ratio`` = tok/s over
  the baseline's; each row names its ``arch``. Every arm's MLM (generator) loss on the first batch, from identical
  weights in eval mode, is recorded with its relative difference to the baseline's (``first_loss_rel_diff``): they
  must agree (fp32: to rounding; bf16: to a few 2**-8). Masking uses a static count per block for all arms (as
  BERT's reference pipeline).

* ``decouple``: DESIGN.md §4 invariant (4). Local-update (and, with ``--synthetic``, synthetic-gradient with
  staleness ``--staleness``) pipelines of K processes (``torchrun``, gloo on CPU /
  NCCL on GPU, one thread per process on CPU) against the single-process backprop step of the trainer
  (``BackpropStep``), every arm built as ``fit`` builds it, on the same model, global batch and number of steps. The baseline
  runs with 1 and with ``--baseline-threads`` threads so the comparison is honest; ``ratio`` is tok/s over the
  1-thread baseline, ``ratio_vs_best_baseline`` over the fastest baseline. Batches are masked before the clock
  starts (the trainer masks in DataLoader workers); warm-up steps are excluded; the pipeline's time is that of
  its last chunk in steady state: from the end of the last warm-up step to the end of the last timed step,
  without draining the pipeline in between (a long run fills it once). ``--fast`` (default: on CUDA only) puts
  every arm on the fast path (``model.fast``: the trainer's compiled step; each chunk compiled); masking uses a
  static count per block. Every configuration runs ``--repeat`` times round-robin; the summary rows
  (``"summary": true``, printed last) take each configuration's best run, the least disturbed by other processes
  (each run records the load average at its start).

* ``quality``: issue 18's time to quality. Real training runs (``scripts/pretrain.py``, ``torchrun`` for the
  2-process arms) of backprop (1 process × 2 threads, × 1 thread), local updates K = 2 (2 processes × 1 thread;
  also overlapping, and then backprop), the shipped synthetic-gradient setting (and then backprop) and the
  frozen-lower-chunk control at two shapes and several seeds: held-out loss against tokens and wall clock,
  G at equal tokens and at equal wall time, time to backprop's final loss; JSON + PNG (see
  ``pretrain/bench/quality.py``).

* ``data``: issue 19's data preparation. Ours (``prepare_blocks``, ``data.num_proc`` 1 and N) against the HF way
  (``datasets.load_dataset("text")`` + ``map(tokenize)`` + ``map(group_texts)``, num_proc 1 and N) with the same
  tokenizer and block size on text files of ``--sizes-mb`` made from the config's corpus; every run a fresh process,
  A/B/A/B: preparation time and tok/s, peak Pss_Anon of the process tree, disk bytes per token, the cached second
  call; medians and ours/HF ratios, JSON + a markdown table (see ``pretrain/bench/data.py``).

Other suites are added as further subcommands; ``_worker`` is internal (one measured configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from objectives import BACKBONES

from ..config import ConfigError, usable_cores
from .common import PRESETS, default_out
from .data import suite_data
from .decouple import run_worker, suite_decouple
from .e2e import suite_e2e
from .quality import ARMS as QUALITY_ARMS
from .quality import SHAPES, ProtocolError, suite_quality
from .step import OUR_VARIANTS, suite_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)

    def shape_args(p):
        p.add_argument("--hidden", type=int, default=128)
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--heads", type=int, default=2)
        p.add_argument("--vocab", type=int, default=8192)
        p.add_argument("--seq", type=int, default=128)
        p.add_argument("--batch", type=int, default=64, help="blocks per micro-batch")
        p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
        p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
        p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before the clock starts")
        p.add_argument("--device", choices=["cpu", "auto"], default="cpu")
        p.add_argument("--staleness", type=int, default=1, help="S of the synthetic-gradient pipelines")
        p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                       help="model.fast for every arm (default: on CUDA only)")

    p = sub.add_parser("decouple", help="local-update pipelines (K processes) vs the single-process backprop step")
    shape_args(p)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4], help="pipeline sizes K to measure")
    p.add_argument("--baseline-threads", type=int, default=2, help="also run the baseline with this many threads")
    p.add_argument("--simulated", action="store_true", help="also time the simulated runtime (1 process)")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (round-robin); best run reported")
    p.add_argument("--synthetic", action="store_true", help="also time synthetic-gradient pipelines (K processes)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/decouple-<date>.json)")

    def model_args(p, suite: str, steps: int, steps_help: str):
        p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (see PRESETS)")
        p.add_argument("--objective", nargs="+", choices=["mlm", "span", "electra"], default=["mlm"])
        p.add_argument("--seq", type=int, default=128)
        p.add_argument("--batch", type=int, default=8, help="blocks per step")
        p.add_argument("--steps", type=int, default=steps, help=steps_help)
        p.add_argument("--repeat", type=int, default=3, help="rounds of timed steps (median reported)")
        p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
        p.add_argument("--device", choices=["cpu", "auto"], default="auto")
        p.add_argument("--out", type=Path, default=None, help=f"JSON file (default benchmarks/{suite}-<date>.json)")

    st = sub.add_parser("step", help="the trainer's step vs the stock transformers step, same process")
    model_args(st, "step", 10, "timed steps per round")
    st.add_argument("--arch", nargs="+", choices=list(BACKBONES), default=["bert"],
                    help="model.arch of the model (each arch its own rows); the baseline is that arch's stock "
                         "*ForMaskedLM")
    st.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before the rounds")
    st.add_argument("--compile", action="store_true", help="torch.compile the baseline's loss function")
    st.add_argument("--ours", nargs="+", choices=list(OUR_VARIANTS), default=None,
                    help="variants of our step, each its own arm (default: fast on CUDA, eager on CPU)")

    e = sub.add_parser("e2e", help="the whole trainer (fit) vs its pure step, same process")
    model_args(e, "e2e", 20, "steps per window (fit runs two windows)")
    e.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="model.fast for the trainer and its pure step (default: on CUDA only)")
    e.add_argument("--workers", type=int, default=1, help="DataLoader workers of fit")
    e.add_argument("--documents", type=int, default=2000, help="documents in the synthetic corpus")

    q = sub.add_parser("quality", help="held-out loss vs tokens and wall clock: backprop vs decoupled arms (real runs)")
    q.add_argument("--config", type=Path, default=Path("configs") / "tiny.yaml", help="base config (data, vocab)")
    q.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    q.add_argument("--arms", nargs="+", choices=list(QUALITY_ARMS), default=list(QUALITY_ARMS))
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--eval-every", type=int, default=100)
    q.add_argument("--eval-batches", type=int, default=16)
    q.add_argument("--batch", type=int, default=32, help="blocks per step")
    q.add_argument("--switch-at", type=float, default=0.75,
                   help="the hybrid arms switch to backprop after this fraction of the steps")
    q.add_argument("--override", nargs="*", default=[], help="extra key.sub=value overrides for every arm")
    q.add_argument("--out-runs", type=Path, default=Path("runs") / "quality", help="the arms' run directories")
    q.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/quality-<date>.json)")

    d = sub.add_parser("data", help="data preparation: ours (num_proc 1 and N) vs datasets map + group_texts")
    d.add_argument("--config", type=Path, default=Path("configs") / "tiny.yaml",
                   help="its corpus (repeated into the text files), tokenizer and data.block_size")
    d.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 16, 64], help="corpus text file sizes (MiB)")
    d.add_argument("--num-proc", type=int, default=usable_cores(), help="N, the processes of the parallel arms")
    d.add_argument("--repeat", type=int, default=3, help="rounds per size (medians reported)")
    d.add_argument("--work", type=Path, default=Path("runs") / "bench-data",
                   help="corpora, tokenizer, the arms' caches (removed after each run) and logs")
    d.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/data-<date>.json; the "
                   "table beside it as .md)")

    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    shape_args(w)
    w.add_argument("--kind", choices=["backprop", "local", "synthetic"], required=True)
    w.add_argument("--chunks", type=int, default=1)
    w.add_argument("--threads", type=int, default=1)

    args = parser.parse_args(argv)
    if args.suite == "_worker":
        run_worker(args)
        return 0
    suites = {"decouple": suite_decouple, "step": suite_step, "e2e": suite_e2e, "quality": suite_quality,
              "data": suite_data}
    try:
        results = suites[args.suite](args)
    except (ConfigError, ProtocolError) as e:  # bad input: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or default_out(args.suite)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
