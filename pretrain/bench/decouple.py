"""The ``decouple`` suite (DESIGN.md §4 invariant 4): local-update (and synthetic-gradient) pipelines of K
processes against the single-process backprop step, every arm the trainer's own step (``pretrain.steps``) on the
same model, global batch and number of steps. See ``pretrain.bench.cli`` for the protocol."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

from .common import RandomTokenizer, environment, free_port


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
    """One configuration: ``backprop`` or a decoupled pipeline (simulated when alone, distributed under torchrun),
    built exactly as ``fit`` builds its step (``pretrain.trainer.setup``; the fast path where ``model.fast``
    resolves to on). Prints one ``RESULT`` JSON line (rank 0 only)."""
    import torch

    torch.set_num_threads(args.threads)
    from pretrain.fast import fast_enabled
    from pretrain.steps import build_step
    from pretrain.trainer import setup

    cfg = bench_config(args, args.chunks, "synthetic" if args.kind == "synthetic" else "local")
    step_runner = build_step(cfg)
    data = types.SimpleNamespace(tokenizer=RandomTokenizer(args.vocab), unigram_counts=None)
    _, _, _, collator, _ = setup(cfg, step_runner, None, data)
    device, world, rank = step_runner.device, step_runner.world_size, int(os.environ.get("RANK", "0"))
    total = args.warmup + args.steps
    batches = random_batches(args, collator, total * args.accum)

    def step(s):
        step_runner.train_step(batches[s * args.accum:(s + 1) * args.accum], cfg.train.lr, s)

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
    fast = fast_enabled(cfg.model, device)
    if args.kind != "backprop":
        step_runner.close()  # receive the outstanding true gradients, wait for the sends
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
    worker = ["-m", "pretrain.bench", "_worker", "--kind", kind, "--chunks", str(chunks), "--threads", str(threads)]
    for name in ("hidden", "layers", "heads", "vocab", "seq", "batch", "accum", "steps", "warmup", "device",
                 "staleness"):
        worker += [f"--{name}", str(getattr(args, name))]
    if args.fast is not None:
        worker.append("--fast" if args.fast else "--no-fast")
    if processes > 1:
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


def suite_decouple(args) -> list[dict]:
    """Every configuration ``--repeat`` times, round-robin (a disturbance hits all of them alike); each run's row
    carries the 1-minute load average at its start. The summary row of a configuration (``"summary": true``) takes
    its best run (least disturbed by other processes) and its median; ratios use the baselines' best runs."""
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "seq", "batch", "accum", "steps",
                                           "warmup")}
    env = environment(args.device)
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
               "baseline": "backprop-1proc-1thread (the trainer's BackpropStep: accumulation, clip, finite check, "
                           "AdamW)",
               **shape, **env}
        print(json.dumps(row), flush=True)
        summary.append(row)
    return summary + rows
