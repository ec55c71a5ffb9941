"""Benchmarks. Each suite prints one JSON line per configuration and writes them to benchmarks/<suite>-<date>.json.

    python scripts/benchmark.py decouple [--chunks 2 4] [--steps 30] ...
    python scripts/benchmark.py step --preset bert-base --seq 128 --batch 256 --objective mlm ...

Suites (subcommands):

* ``e2e``: DESIGN.md §6. The whole trainer (``fit`` on a synthetic Zipf-law corpus: DataLoader workers masking,
  the loop, metrics) against its pure step on pre-collated batches of the same blocks, in one process; ``ratio``
  = end-to-end tok/s over pure-step tok/s (target >= 0.95).
* ``step``: DESIGN.md §6. One optimizer step of the stock ``transformers`` recipe a user would write (the
  baseline: ``BertForMaskedLM(labels=...)`` / ``ElectraForMaskedLM`` + ``ElectraForPreTraining`` with
  full-vocabulary logits, SDPA, AdamW (fused on CUDA), clip 1.0, bf16 autocast on CUDA, ``torch.compile`` with
  ``--compile``) against the trainer's step on the same model shape, batch and precision (the objective's sparse
  heads, ``accumulate_gradients``, the same optimizer), in one or more variants (``--ours``, each its own arm on
  its own copy of the weights: ``eager``, ``fused``, ``compiled+mask``, ``compiled``, ``fast`` = ``model.fast``;
  see ``OUR_VARIANTS``; default ``fast`` on CUDA, ``eager`` on CPU), so one run ablates the fast path's levers.
  All arms run in one process, round-robin, on random-token batches masked off the clock; warm-up steps are
  excluded; CUDA is synchronised around the timed steps; the step time is the median over ``--repeat`` rounds.
  Each row: device, versions, tok/s, step ms, MFU (see ``pretrain.metrics.train_flops_per_token``: 6·N +
  12·layers·hidden·seq FLOPs per token, N the non-embedding parameters of the encoder(s); null on CPUs), the arm's
  own peak memory (CUDA only: its parameters and optimizer state plus the peak its steps allocate on top, so the
  other arms' weights do not count; null on CPU), ``peak_mem_ratio`` to the baseline's and ``ratio`` = tok/s over
  the baseline's. Every arm's MLM (generator) loss on the first batch, from identical weights in eval mode, is
  recorded with its relative difference to the baseline's (``first_loss_rel_diff``): they must agree (fp32: to
  rounding; bf16: to a few 2**-8). Masking uses a static count per block for all arms (as BERT's reference pipeline).

* ``decouple``: DESIGN.md §4 invariant (4). Local-update (and, with ``--synthetic``, synthetic-gradient with
  staleness ``--staleness``) pipelines of K processes (``torchrun``, gloo on CPU /
  NCCL on GPU, one thread per process on CPU) against the single-process backprop step of the trainer
  (``accumulate_gradients`` + clip + AdamW) on the same model, global batch and number of steps. The baseline
  runs with 1 and with ``--baseline-threads`` threads so the comparison is honest; ``ratio`` is tok/s over the
  1-thread baseline, ``ratio_vs_best_baseline`` over the fastest baseline. Batches are masked before the clock
  starts (the trainer masks in DataLoader workers); warm-up steps are excluded; the pipeline's time is that of
  its last chunk in steady state: from the end of the last warm-up step to the end of the last timed step,
  without draining the pipeline in between (a long run fills it once). ``--fast`` (default: on CUDA only) puts
  every arm on the fast path (``model.fast``: the trainer's compiled step; each chunk compiled); masking uses a
  static count per block. Every configuration runs ``--repeat`` times round-robin; the summary rows
  (``"summary": true``, printed last) take each configuration's best run, the least disturbed by other processes
  (each run records the load average at its start).

Other suites are added as further subcommands; ``_worker`` is internal (one measured configuration).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# scripts/pretrain.py would shadow the `pretrain` package: drop this folder from the import path
sys.path = [p for p in sys.path if Path(p or os.getcwd()).resolve() != Path(__file__).resolve().parent]


class RandomTokenizer:
    """Just what an objective needs from a tokenizer: size and special ids (BERT layout: PAD 0, UNK 1, CLS 2,
    SEP 3, MASK 4)."""

    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3, 4
    all_special_ids = [0, 1, 2, 3, 4]

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Made-up tokens, every one a word start (no "##" pieces)."""
        return {f"t{i}": i for i in range(self.vocab_size)}


def bench_config(args, chunks: int, mode: str = "local"):
    from pretrain.config import config_from_dict

    decouple = {"mode": mode if chunks > 1 else "none", "chunks": chunks}
    if decouple["mode"] == "synthetic":
        decouple["synthetic"] = {"staleness": args.staleness}
    return config_from_dict({
        "output_dir": "unused",
        "data": {"files": ["random-tokens"], "block_size": args.seq, "num_workers": 0},
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                  "intermediate_size": 4 * args.hidden, "max_position_embeddings": args.seq,
                  "hidden_dropout": 0.1, "attention_dropout": 0.1, "fast": args.fast},
        # a static masked count per block (BERT's reference pipeline): the fast path's static shapes
        "objective": {"name": "mlm", "mlm": {"static_count": True}},
        "train": {"micro_batch_size": args.batch, "grad_accum": args.accum, "max_steps": 10 ** 6, "lr": 1e-3,
                  "warmup_steps": 0, "schedule": "constant", "device": args.device},
        "decouple": decouple,
        "log": {"tensorboard": False},
    })


def random_batches(args, collator, n: int) -> list[dict]:
    """``n`` masked micro-batches of random token blocks [CLS] ... [SEP] (masking done here, off the clock)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    batches = []
    for t in range(n):
        examples = []
        for i in range(args.batch):
            ids = torch.randint(5, args.vocab, (args.seq - 2,), generator=gen).tolist()
            examples.append({"input_ids": [2, *ids, 3], "index": t * args.batch + i})
        batches.append(collator.collate(examples))
    return batches


def run_worker(args) -> None:
    """One configuration: ``backprop`` (the trainer's step) or ``local`` (the decoupled pipeline, simulated when
    alone, distributed under torchrun), both on the fast path where ``model.fast`` resolves to on (the trainer's
    ``apply_fast_path`` + ``compile_step``; the runtime's ``apply_fast_path_to_chunks``). Prints one JSON line
    (rank 0 only)."""
    import torch

    torch.set_num_threads(args.threads)
    from accelerate.utils import set_seed

    from pretrain.decouple.runtime import (Pipeline, build_chunked_model, init_distributed, pick_device,
                                           resolve_layout, window_normalizers)
    from pretrain.fast import apply_fast_path, apply_fast_path_to_chunks, compile_step, fast_enabled

    cfg = bench_config(args, args.chunks, "synthetic" if args.kind == "synthetic" else "local")
    tok = RandomTokenizer(args.vocab)
    set_seed(0)
    total = args.warmup + args.steps
    if args.kind == "backprop":
        from accelerate import Accelerator

        from objectives import get_objective
        from pretrain.optim import build_optimizer
        from pretrain.trainer import PretrainModule, accumulate_gradients

        accelerator = Accelerator(cpu=args.device == "cpu")
        device = accelerator.device
        fast = fast_enabled(cfg.model, device)
        objective = get_objective("mlm", tok, seed=0, **cfg.objective.options())
        model = objective.build_model(cfg.model)
        if fast:
            apply_fast_path(model, objective, args.seq)
        module = PretrainModule(model, objective)
        optimizer = build_optimizer(module, cfg.train, device.type)
        module, optimizer = accelerator.prepare(module, optimizer)
        if fast:
            compile_step(module)
        batches = random_batches(args, objective, total * args.accum)
        world, rank = 1, 0

        def step(s):
            accumulate_gradients(module, objective, batches[s * args.accum:(s + 1) * args.accum], accelerator)
            accelerator.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def drain():
            pass
    else:
        layout = resolve_layout(cfg.decouple)
        device = pick_device(cfg.train, layout)
        init_distributed(layout, device)
        model, collator = build_chunked_model(cfg, tok)
        model.to(device)
        fast = fast_enabled(cfg.model, device)
        if fast:
            apply_fast_path_to_chunks(model, args.seq)
        pipeline = Pipeline(model, cfg, layout, device)
        batches = random_batches(args, collator, total * args.accum)
        world, rank = layout.world_size, layout.rank

        def step(s):
            micro = batches[s * args.accum:(s + 1) * args.accum]
            pipeline.train_step(micro, window_normalizers(collator, micro, device), 1e-3)

        def drain():
            if pipeline.synthetic:  # receive the outstanding true gradients first: flush waits for their sends
                pipeline.exchange_gradients(drain=True)
            if pipeline.link is not None:
                pipeline.link.flush()

    def sync_device():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Steady state: the clock runs on the process that holds the last chunk (the pipeline's sink: its step t ends
    # only after every chunk below has done t), from the end of the last warm-up step to the end of the last timed
    # step; the pipeline is not drained in between, so the fill happens during warm-up and is not timed.
    last = rank == world - 1
    for s in range(args.warmup):
        step(s)
    sync_device()
    start = time.perf_counter()
    for s in range(args.warmup, total):
        step(s)
    if last:
        sync_device()
    elapsed = time.perf_counter() - start
    drain()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if world > 1:
        stats = torch.tensor([elapsed if last else 0.0, peak_mb], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        torch.distributed.all_gather(gathered, stats)
        elapsed = float(gathered[-1][0])
        peak_mb = max(float(g[1]) for g in gathered)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        tokens = args.steps * args.accum * args.batch * args.seq
        print("RESULT " + json.dumps({"tok_per_s": tokens / elapsed, "step_ms": 1000 * elapsed / args.steps,
                                      "peak_mem_mb": peak_mb, "fast": fast}), flush=True)


def launch(args, kind: str, chunks: int, processes: int, threads: int) -> dict:
    """Run one configuration in fresh process(es) with ``threads`` threads each; returns its RESULT dict."""
    worker = [str(Path(__file__).resolve()), "_worker", "--kind", kind, "--chunks", str(chunks),
              "--threads", str(threads)]
    for name in ("hidden", "layers", "heads", "vocab", "seq", "batch", "accum", "steps", "warmup", "device",
                 "staleness"):
        worker += [f"--{name}", str(getattr(args, name))]
    if args.fast is not None:
        worker.append("--fast" if args.fast else "--no-fast")
    if processes > 1:
        sys.path.insert(0, str(ROOT / "tests"))
        from distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *worker]
    else:
        cmd = [sys.executable, *worker]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def environment(args) -> dict:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    return {"device": device, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def suite_decouple(args) -> list[dict]:
    """Every configuration ``--repeat`` times, round-robin (a disturbance hits all of them alike); each run's row
    carries the 1-minute load average at its start. The summary row of a configuration (``"summary": true``) takes
    its best run (least disturbed by other processes) and its median; ratios use the baselines' best runs."""
    import statistics

    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "seq", "batch", "accum", "steps",
                                           "warmup")}
    env = environment(args)
    on_gpu = env["device"] != "cpu"
    configs = [("backprop-1proc-1thread", "backprop", 1, 1, 1)]
    if not on_gpu and args.baseline_threads > 1:
        configs.append((f"backprop-1proc-{args.baseline_threads}threads", "backprop", 1, 1, args.baseline_threads))
    for k in args.chunks:
        configs.append((f"local-K{k}-{k}proc-1thread", "local", k, k, 1))
        if args.simulated:
            configs.append((f"local-K{k}-simulated-1thread", "local", k, 1, 1))
        if args.synthetic:
            configs.append((f"synthetic-S{args.staleness}-K{k}-{k}proc-1thread", "synthetic", k, k, 1))
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    rows = []
    for round_index in range(args.repeat):
        for name, kind, chunks, processes, threads in configs:
            load = os.getloadavg()[0]
            res = launch(args, kind, chunks, processes, threads)
            row = {"suite": "decouple", "config": name, "round": round_index, "kind": kind, "chunks": chunks,
                   "processes": processes, "threads_per_process": threads, **res, "load_avg_1m_at_start": load}
            print(json.dumps(row), flush=True)
            rows.append(row)
            runs[name].append(row)
    best = {name: max(r["tok_per_s"] for r in rs) for name, rs in runs.items()}
    base1 = best["backprop-1proc-1thread"]
    best_base = max(v for n, v in best.items() if n.startswith("backprop"))
    summary = []
    for name, kind, chunks, processes, threads in configs:
        rs = runs[name]
        top = max(rs, key=lambda r: r["tok_per_s"])
        row = {"suite": "decouple", "summary": True, "config": name, "kind": kind, "chunks": chunks,
               "processes": processes, "threads_per_process": threads, "tok_per_s": top["tok_per_s"],
               "step_ms": top["step_ms"], "median_tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
               "runs": len(rs), "peak_mem_mb": top["peak_mem_mb"], "mfu": None, "fast": top["fast"],
               "ratio": top["tok_per_s"] / base1, "ratio_vs_best_baseline": top["tok_per_s"] / best_base,
               "baseline": "backprop-1proc-1thread (trainer step: accumulate_gradients + clip + AdamW)",
               **shape, **env}
        print(json.dumps(row), flush=True)
        summary.append(row)
    return summary + rows


# --------------------------------------------------------------------------- step suite (DESIGN.md §6)

PRESETS = {
    # name: (hidden, layers, heads, intermediate, vocab, embedding_size)
    "tiny": (64, 2, 2, 256, 1000, None),
    "compare-cpu": (128, 2, 2, 512, 8192, None),  # the models of scripts/compare_objectives.py
    "bert-base": (768, 12, 12, 3072, 30522, None),
    "electra-small": (256, 12, 4, 1024, 30522, 128),
}


BASELINES = {
    "mlm": "stock BertForMaskedLM(labels=...) (full-vocabulary logits), clip, AdamW",
    "span": "stock BertForMaskedLM(labels=...) on the span-masked batch; no SBO head (transformers has none), so "
            "the ratio understates ours, which also computes the SBO loss",
    "electra": "StockElectra: ElectraForMaskedLM(labels=...) full logits, torch.multinomial replacements, "
               "ElectraForPreTraining(labels=...), clip, AdamW",
}


def step_config(args, objective: str, device):
    from pretrain.config import config_from_dict

    hidden, layers, heads, intermediate, _, embedding = PRESETS[args.preset]
    return config_from_dict({
        "output_dir": "unused",
        "data": {"files": ["random-tokens"], "block_size": args.seq, "num_workers": 0},
        "model": {"hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                  "intermediate_size": intermediate, "max_position_embeddings": max(512, args.seq),
                  "embedding_size": embedding, "hidden_dropout": 0.1, "attention_dropout": 0.1},
        # a static masked count per block, as BERT's reference data pipeline (and the fast path's static shapes)
        "objective": {"name": objective, "mlm": {"static_count": True}},
        "train": {"micro_batch_size": args.batch, "max_steps": 10 ** 6, "lr": 1e-4, "warmup_steps": 0,
                  "schedule": "constant", "device": device.type,
                  "precision": "bf16" if device.type == "cuda" else "fp32"},
        "log": {"tensorboard": False},
    })


def random_blocks(n: int, batch: int, seq: int, vocab: int) -> list[list[dict]]:
    """``n`` micro-batches of ``batch`` random blocks [CLS] ... [SEP] with their stream indices."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [[{"input_ids": [2, *torch.randint(5, vocab, (seq - 2,), generator=gen).tolist(), 3],
              "index": t * batch + i} for i in range(batch)] for t in range(n)]


class StockElectra:
    """The ELECTRA step a user writes with the stock classes: full [B, L, V] generator logits through
    ``ElectraForMaskedLM(labels=...)``, replacements drawn with ``torch.multinomial`` from the softmax at the
    masked positions (no gradient), ``ElectraForPreTraining(labels=replaced)``; loss = gen + 50 * disc."""

    def __init__(self, ours):
        self.generator, self.discriminator = ours.generator, ours.discriminator

    def parameters(self):
        return list({id(p): p for m in (self.generator, self.discriminator) for p in m.parameters()}.values())

    def loss(self, batch: dict):
        import torch

        gen_out = self.generator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"])
        selected = batch["labels"] != -100
        with torch.no_grad():
            probs = torch.softmax(gen_out.logits[selected].float(), -1)
            sampled = torch.multinomial(probs, 1).squeeze(1)
        disc_ids = batch["original_ids"].clone()
        disc_ids[selected] = sampled
        replaced = (disc_ids != batch["original_ids"]).long()
        disc_out = self.discriminator(input_ids=disc_ids, attention_mask=batch["attention_mask"], labels=replaced)
        return gen_out.loss + 50.0 * disc_out.loss, gen_out.loss


class Variant(typing.NamedTuple):
    """One of our arm's variants (``--ours``)."""

    fast: bool  #: ``apply_fast_path`` (static shapes) + ``compile_step``
    fuse: bool  #: FusedEncoder stacks
    keep_mask: bool  #: feed the encoders the all-ones mask of unpadded blocks
    what: str  #: the row's description


OUR_VARIANTS = {
    "eager": Variant(False, False, False, "the trainer's step (objective's sparse heads, accumulate_gradients, "
                                          "clip, AdamW), model.fast off"),
    "fused": Variant(False, True, False, "the trainer's step with FusedEncoder stacks, eager"),
    # the DESIGN §6 profile's setting, and the same without the all-ones mask (SDPA may use flash)
    "compiled+mask": Variant(True, False, True, "static-shape heads, HF encoders fed the all-ones attention mask, "
                                                "step compiled"),
    "compiled": Variant(True, False, False, "static-shape heads, HF encoders without a mask on unpadded blocks, "
                                            "step compiled"),
    "fast": Variant(True, True, False, "model.fast: static-shape heads, FusedEncoder stacks without a mask on "
                                       "unpadded blocks, step compiled"),
}


def trainer_step(cfg, objective, model, device, keep_mask: bool = False, compile: bool = False):
    """The trainer's optimizer step on one micro-batch (``accumulate_gradients`` + clip + AdamW, precision of
    ``cfg.train``; ``compile``: the fast path's ``compile_step``); returns (the prepared module, its optimizer,
    step(batch)). ``keep_mask``: hand the encoders the all-ones attention mask of unpadded batches (as HF does under
    compile) instead of none."""
    from accelerate import Accelerator

    from pretrain.fast import compile_step
    from pretrain.optim import build_optimizer
    from pretrain.trainer import PretrainModule, accumulate_gradients

    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision="bf16" if cfg.train.precision == "bf16" else "no")
    module = PretrainModule(model, objective)
    optimizer = build_optimizer(module, cfg.train, device.type)
    module, optimizer = accelerator.prepare(module, optimizer)
    if compile:
        compile_step(module)

    def step(batch):
        accumulate_gradients(module, objective, [dict(batch, padded=True) if keep_mask else batch], accelerator)
        accelerator.clip_grad_norm_(module.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return module, optimizer, step


def state_bytes(parameters, optimizer) -> int:
    """Bytes an arm holds between steps: its parameters and optimizer state (gradients are freed by
    ``zero_grad(set_to_none=True)``). Lets each arm's peak memory be reported without the other arms' state."""
    import torch

    tensors = list(parameters) + [v for st in optimizer.state.values() for v in st.values()
                                  if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def step_arms(args, objective_name: str, device):
    """The arms on the same initial weights: ``baseline`` and one ``ours:<variant>`` per ``--ours`` variant, each a
    dict with ``step`` (one optimizer step on a micro-batch), ``first_loss(batch)`` (the MLM/generator loss, eval
    mode; call it before any step) and ``state()`` (bytes of its parameters and optimizer state)."""
    import contextlib
    import copy

    import torch

    from objectives import get_objective
    from pretrain.data.stream import to_device
    from pretrain.fast import apply_fast_path, fuse_encoders

    cfg = step_config(args, objective_name, device)
    vocab = PRESETS[args.preset][4]
    tok = RandomTokenizer(vocab)
    torch.manual_seed(0)
    objective = get_objective(objective_name, tok, seed=0, **cfg.objective.options())
    if hasattr(objective, "set_unigram_counts"):
        objective.set_unigram_counts(torch.ones(vocab))
    model = objective.build_model(cfg.model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else contextlib.nullcontext())
    key = {"mlm": "mlm_loss", "span": "mlm_loss", "electra": "gen_loss"}[objective_name]

    def evaluated(modules, loss):
        with torch.no_grad():
            for m in modules:
                m.eval()
            with autocast:
                value = float(loss())
            for m in modules:
                m.train()
        return value

    arms = {}
    for variant in args.ours:
        v = OUR_VARIANTS[variant]
        ours, our_objective = copy.deepcopy(model), copy.deepcopy(objective)  # identical initial weights
        if v.fast:
            apply_fast_path(ours, our_objective, args.seq, fuse=v.fuse)
        elif v.fuse:
            fuse_encoders(ours)
        module, optimizer, step = trainer_step(cfg, our_objective, ours, device, v.keep_mask, compile=v.fast)
        arms[f"ours:{variant}"] = {
            "step": step, "state": lambda m=module, o=optimizer: state_bytes(m.parameters(), o),
            "first_loss": lambda b, module=module: evaluated([module], lambda: module(to_device(b, device))[key])}

    stock = model
    if objective_name == "electra":
        baseline_model = StockElectra(stock)
        for m in (stock.generator, stock.discriminator):
            m.to(device)
        parameters = baseline_model.parameters()
        baseline_loss = baseline_model.loss
    else:
        stock.to(device)
        parameters = list(stock.parameters())

        def baseline_loss(batch):
            out = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out.loss, out.loss

    if args.compile:
        baseline_loss = torch.compile(baseline_loss)
    baseline_opt = torch.optim.AdamW(parameters, lr=1e-4, eps=1e-6, weight_decay=0.01,
                                     fused=device.type == "cuda" or None)

    def baseline_step(batch):
        batch = to_device(batch, device)
        with autocast:
            loss, _ = baseline_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        baseline_opt.step()
        baseline_opt.zero_grad(set_to_none=True)

    stock_modules = [stock.generator, stock.discriminator] if objective_name == "electra" else [stock]
    baseline = {"step": baseline_step, "state": lambda: state_bytes(parameters, baseline_opt),
                "first_loss": lambda b: evaluated(stock_modules, lambda: baseline_loss(to_device(b, device))[1])}
    arms = {"baseline": baseline, **arms}
    n_params = sum(p.numel() for m in stock_modules for n, p in m.named_parameters() if "embeddings" not in n)
    return cfg, objective, arms, n_params


def seconds_per_step(step, batches: list[dict], steps: int, device) -> float:
    """Wall time of ``steps`` calls of ``step`` over ``batches`` (cycled) divided by ``steps``; CUDA is
    synchronised before the clock starts and before it stops."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        step(batches[s % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def suite_step(args) -> list[dict]:
    import statistics

    import torch

    from pretrain.metrics import peak_flops, train_flops_per_token

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    args.ours = args.ours or (["fast"] if device.type == "cuda" else ["eager"])
    # every compiled arm adds graphs (train/eval, generator/discriminator) to the one code object HF's forward
    # wrapper shares between instances: past the default limit of 8, later arms would silently run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment(args)
    rows = []
    for objective_name in args.objective:
        cfg, objective, arms, n_params = step_arms(args, objective_name, device)
        batches = [objective.collate(b) for b in random_blocks(8, args.batch, args.seq, PRESETS[args.preset][4])]
        first_loss = {arm: a["first_loss"](batches[0]) for arm, a in arms.items()}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        peaks: dict[str, float | None] = {arm: None for arm in arms}
        for arm in arms.values():  # warm-up (and compilation) off the clock
            for s in range(args.warmup):
                arm["step"](batches[s % len(batches)])
        for _ in range(args.repeat):
            for name, arm in arms.items():
                if device.type == "cuda":  # the arm's own peak: its state, plus what its steps allocate on top
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                times[name].append(seconds_per_step(arm["step"], batches, args.steps, device))
                if device.type == "cuda":
                    own = (torch.cuda.max_memory_allocated() - held + arm["state"]()) / 2 ** 20
                    peaks[name] = max(peaks[name] or 0.0, own)
        tokens = args.batch * args.seq
        flops = tokens * train_flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size, args.seq)
        peak = peak_flops(env["device"])
        step_s = {arm: statistics.median(ts) for arm, ts in times.items()}
        for name in arms:
            arm, _, variant = name.partition(":")
            row = {"suite": "step", "arm": arm, "variant": variant or None,
                   "what": BASELINES[objective_name] if arm == "baseline" else OUR_VARIANTS[variant].what,
                   "objective": objective_name, "preset": args.preset,
                   "seq": args.seq, "batch": args.batch, "precision": cfg.train.precision,
                   "compile_baseline": bool(args.compile), "tok_per_s": tokens / step_s[name],
                   "step_ms": 1000 * step_s[name], "step_ms_rounds": [1000 * t for t in times[name]],
                   "mfu": flops / step_s[name] / peak if peak else None, "peak_mem_mb": peaks[name],
                   "peak_mem_ratio": (peaks[name] / peaks["baseline"]) if peaks[name] else None,
                   "ratio": step_s["baseline"] / step_s[name], "first_mlm_loss": first_loss[name],
                   "first_loss_rel_diff": abs(first_loss[name] - first_loss["baseline"]) / abs(first_loss["baseline"]),
                   "threads": args.threads, **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def write_zipf_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """One document per line of made-up words drawn from a Zipf law over 20k word types (realistic token lengths
    and frequencies for the tokenizer, packing and masking; the content is meaningless)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20_000)]
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(words[i] for i in rng.choice(len(words), size=rng.integers(100, 400), p=probs)) + "\n")
    return path


def suite_e2e(args) -> list[dict]:
    """The whole trainer (``fit``: DataLoader workers masking, the loop, metrics) against its pure step on
    pre-collated batches of the same blocks, model and precision, in one process. ``fit`` runs 2 x ``--steps``
    steps logging every ``--steps``: its second window's tok/s (warm-up and compilation fall in the first) is the
    end-to-end figure; ``ratio`` = end-to-end / pure step (target >= 0.95, DESIGN.md §6)."""
    import statistics
    import tempfile

    import torch

    from objectives import get_objective
    from pretrain.config import config_from_dict
    from pretrain.data import prepare_blocks
    from pretrain.fast import apply_fast_path, fast_enabled
    from pretrain.trainer import fit

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    env = environment(args)
    hidden, layers, heads, intermediate, vocab, embedding = PRESETS[args.preset]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        corpus = write_zipf_corpus(Path(tmp) / "corpus.txt", args.documents)
        for objective_name in args.objective:
            cfg = config_from_dict({
                "output_dir": f"{tmp}/run-{objective_name}",
                "data": {"files": [str(corpus)], "block_size": args.seq, "validation_fraction": 0.01,
                         "num_workers": args.workers, "cache_dir": f"{tmp}/cache"},
                "tokenizer": {"vocab_size": vocab},
                "model": {"hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                          "intermediate_size": intermediate, "max_position_embeddings": max(512, args.seq),
                          "embedding_size": embedding, "fast": args.fast},
                "objective": {"name": objective_name, "mlm": {"static_count": True}},
                "train": {"micro_batch_size": args.batch, "max_steps": 2 * args.steps, "lr": 1e-4,
                          "warmup_steps": 0, "eval_every": 0, "eval_batches": 1, "save_every": 0,
                          "log_every": args.steps, "device": device.type,
                          "precision": "bf16" if device.type == "cuda" else "fp32"},
                "log": {"tensorboard": False},
            })
            fit(cfg)
            records = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl")]
            e2e = [r for r in records if r.get("split") == "train"][-1]

            data = prepare_blocks(cfg)  # the cache fit() built
            objective = get_objective(objective_name, data.tokenizer, seed=0, **cfg.objective.options())
            if hasattr(objective, "set_unigram_counts"):
                objective.set_unigram_counts(data.unigram_counts)
            model = objective.build_model(cfg.model)
            fast = fast_enabled(cfg.model, device)
            if fast:
                apply_fast_path(model, objective, args.seq)
            _, _, step = trainer_step(cfg, objective, model, device, compile=fast)
            batches = [objective.collate([dict(data.train[(t * args.batch + i) % len(data.train)],
                                               index=t * args.batch + i) for i in range(args.batch)])
                       for t in range(8)]
            for t in range(args.steps):  # warm-up, as fit's first window
                step(batches[t % len(batches)])
            times = [seconds_per_step(step, batches, args.steps, device) for _ in range(args.repeat)]
            pure = args.batch * args.seq / statistics.median(times)
            row = {"suite": "e2e", "objective": objective_name, "preset": args.preset, "seq": args.seq,
                   "batch": args.batch, "workers": args.workers, "precision": cfg.train.precision,
                   "fast": fast_enabled(cfg.model, device), "e2e_tok_per_s": e2e["tok_per_s"],
                   "e2e_data_wait": e2e["data_wait"], "pure_step_tok_per_s": pure,
                   "ratio": e2e["tok_per_s"] / pure, "threads": args.threads, **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


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

    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    shape_args(w)
    w.add_argument("--kind", choices=["backprop", "local", "synthetic"], required=True)
    w.add_argument("--chunks", type=int, default=1)
    w.add_argument("--threads", type=int, default=1)

    args = parser.parse_args(argv)
    if args.suite == "_worker":
        run_worker(args)
        return 0
    results = {"decouple": suite_decouple, "step": suite_step, "e2e": suite_e2e}[args.suite](args)
    out = args.out or ROOT / "benchmarks" / f"{args.suite}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
