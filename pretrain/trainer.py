"""The training loop: one explicit function, ``fit(cfg)``, on top of accelerate.

Per optimizer step: set the LR (a function of the step) → fetch the step's micro-batches → sum their target counts
over the window and all processes → forward/backward each micro-batch with losses normalised by those global
counts (so the gradient equals the big batch's) → clip → finite check → step → log / evaluate / checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext

import torch
from torch import nn

from objectives import get_objective

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, config_to_dict, save_config
from .data.stream import StreamDataset, make_loader, to_device
from .ewc import prepare_continued, resolve_source
from .hf_io import roundtrip_check, unwrap
from .fast import apply_fast_path, compile_step, fast_enabled
from .optim import build_optimizer, step_if_finite
from .rundir import RunDirError, check_tokenizer, prepare_run_dir
from .metrics import MetricsLogger, MetricTracker, peak_flops, train_flops_per_token
from .schedules import apply_schedule

#: stream positions of validation examples start here, so their masking seeds never collide with training ones
VALIDATION_INDEX_OFFSET = 1 << 40


class PretrainModule(nn.Module):
    """Holds the trained model(s) and the objective (with its own heads) so one optimizer, one DDP wrapper and one
    checkpoint cover both. ``forward(batch, normalizers)`` is the objective's loss dict."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch, normalizers=None):
        return self.objective(self.model, batch, normalizers)


@torch.no_grad()
def evaluate(module, collator, val_blocks, cfg: Config, accelerator) -> dict[str, float]:
    """Token-exact validation metrics over a fixed set of validation blocks with fixed masks."""
    b, world = cfg.train.micro_batch_size, accelerator.num_processes
    n_batches = max(1, min(cfg.train.eval_batches, len(val_blocks) // (b * world)))
    dataset = StreamDataset(val_blocks, cfg.train.seed, shuffle=False, index_offset=VALIDATION_INDEX_OFFSET)
    loader = make_loader(dataset, collator.collate, b, world, accelerator.process_index, 0, n_batches, 0)
    tracker = MetricTracker(collator.metric_counts)
    module.eval()
    for batch in loader:
        with accelerator.autocast():
            tracker.add(module(to_device(batch, accelerator.device)))
    module.train()
    return tracker.compute(reduce=lambda t: accelerator.reduce(t, "sum"))


def accumulate_gradients(module, collator, micro_batches: list[dict], accelerator) -> list[dict]:
    """Forward/backward every micro-batch of one optimizer step; returns their output dicts.

    Token-exact: each loss part is normalised by its target count summed over the whole window and all processes.
    DDP averages gradients over processes, so the normalisers are divided by the world size: the resulting gradient
    is sum(losses) / global count, exactly the gradient of one big batch.

    No host sync: the micro-batches are copied to the device without blocking (page-locked when the DataLoader pins
    them) and counted there; a blocking copy of the counts would wait for the previous step's kernels."""
    micro_batches = [to_device(b, accelerator.device) for b in micro_batches]
    counts = collator.window_counts(micro_batches)
    names = sorted(counts)
    totals = torch.stack([counts[k] for k in names])
    world = accelerator.num_processes
    if world > 1:
        totals = accelerator.reduce(totals, "sum")
    normalizers = {k: totals[i] / world for i, k in enumerate(names)}
    outs = []
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with (nullcontext() if sync else accelerator.no_sync(module)), accelerator.autocast():
            out = module(batch, normalizers)
        accelerator.backward(out["loss"])
        outs.append(out)
    return outs


def fit(cfg: Config, overwrite: bool = False) -> dict:
    """Train ``cfg`` to ``cfg.train.max_steps``, resuming from the newest checkpoint in ``cfg.output_dir``, then
    export. Returns the final validation metrics."""
    cfg = resolve_source(cfg)  # continued pretraining (train.ewc.source): checked before anything is written
    if cfg.decouple.mode != "none":
        from .decouple import fit_decoupled

        return fit_decoupled(cfg, overwrite)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import prepare_blocks

    t = cfg.train
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision]
    accelerator = Accelerator(mixed_precision=precision, cpu=t.device == "cpu")
    out = prepare_run_dir(cfg, overwrite, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    with accelerator.main_process_first():
        data = prepare_blocks(cfg)
    tokenizer = check_tokenizer(cfg, data.tokenizer)
    objective = get_objective(cfg.objective.name, tokenizer, seed=t.seed, **cfg.objective.options())
    if hasattr(objective, "set_unigram_counts"):
        objective.set_unigram_counts(data.unigram_counts)
    model = objective.build_model(cfg.model)
    collator = copy.deepcopy(objective)  # a CPU copy for DataLoader workers; the trained one moves to the device
    fast = fast_enabled(cfg.model, accelerator.device)
    if fast:  # static shapes, fused encoders (pretrain/fast.py); the step is compiled once wrapped, below
        apply_fast_path(model, objective, cfg.data.block_size)
    module = PretrainModule(model, objective)
    ewc = prepare_continued(cfg, module, tokenizer, out, accelerator)  # source weights; F and θ* for λ > 0
    optimizer = build_optimizer(module, t, accelerator.device.type)
    module, optimizer = accelerator.prepare(module, optimizer)
    if fast:
        compile_step(module)
    if ewc is not None:
        accelerator.register_for_checkpointing(ewc)  # every checkpoint carries F and θ*
    if accelerator.is_main_process:
        tokenizer.save_pretrained(str(out / "tokenizer"))

    state = {"step": 0, "tokens": 0}
    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        accelerator.print(f"resumed from {resume} (step {state['step']})")

    world, rank = accelerator.num_processes, accelerator.process_index
    tokens_per_step = t.grad_accum * world * t.micro_batch_size * cfg.data.block_size
    train_stream = StreamDataset(data.train, t.seed)
    loader = make_loader(train_stream, collator.collate, t.micro_batch_size, world, rank,
                         start=state["step"] * t.grad_accum, stop=None, num_workers=cfg.data.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    raw = unwrap(module)
    n_params = sum(p.numel() for n, p in raw.model.named_parameters() if "embeddings" not in n)
    flops_per_step = tokens_per_step * train_flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size,
                                                             cfg.data.block_size)
    peak = peak_flops(torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu")
    logger = MetricsLogger(out, accelerator.is_main_process, cfg.log.tensorboard, t.max_steps)
    logger.log({"event": "resume" if resume else "start", "step": state["step"], "world_size": world,
                "config": config_to_dict(cfg)}, prefix="run")
    tracker = MetricTracker({**objective.metric_counts, "ewc_penalty": "n_steps"})
    reduce_sum = (lambda x: accelerator.reduce(x, "sum")) if world > 1 else None

    if state["step"] == 0 and t.eval_every:
        logger.log({"step": 0, **evaluate(module, collator, data.validation, cfg, accelerator)}, prefix="eval")
    module.train()
    step, window_start, data_wait = state["step"], time.perf_counter(), 0.0
    skipped, skipped_logged = torch.zeros((), device=accelerator.device), 0  # updates skipped (on the device)
    while step < t.max_steps:
        lr = apply_schedule(optimizer, t, step)  # the LR (and Adam's beta1 under one-cycle) of this step
        fetch_start = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum)]
        data_wait += time.perf_counter() - fetch_start
        for out_dict in accumulate_gradients(module, collator, micro, accelerator):
            tracker.add(out_dict)
        step_metrics = {"n_steps": torch.ones((), device=accelerator.device)}
        if ewc is not None:  # once per optimizer step, onto the window's reduced gradients (the same on every process)
            step_metrics["ewc_penalty"] = ewc.add_gradient(raw)

        if t.clip_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), t.clip_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        # never step on a NaN/Inf (fp16 leaves that to the grad scaler, which must also see the overflow);
        # gradients are already all-reduced, so every process takes the same decision
        if t.precision == "fp16":
            optimizer.step()
        else:
            skipped = skipped + step_if_finite(optimizer, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state.update(step=step, tokens=state["tokens"] + tokens_per_step)
        tracker.add(step_metrics)

        if step % t.log_every == 0 or step == t.max_steps:
            metrics = tracker.compute(reduce=reduce_sum)
            tracker.reset()
            elapsed = time.perf_counter() - window_start
            steps_in_window = metrics.pop("n_steps", 1.0) / world
            tok_per_s = tokens_per_step * steps_in_window / elapsed
            if int(skipped) > skipped_logged:
                accelerator.print(f"step {step}: {int(skipped) - skipped_logged} update(s) skipped on a non-finite "
                                  "gradient norm since the last log")
            skipped_logged = int(skipped)
            record = {"step": step, "lr": lr, "tokens": state["tokens"], "tok_per_s": tok_per_s,
                      "grad_norm": float(grad_norm), "skipped_steps": skipped_logged,
                      "mfu": flops_per_step * steps_in_window / elapsed / (peak * world) if peak else None,
                      "data_wait": data_wait / elapsed, **metrics}
            record["loss"] = sum(w * record.get(p, 0.0) for p, (_, w) in objective.loss_parts.items())
            logger.log(record)
            logger.progress(record, elapsed / steps_in_window)
            window_start, data_wait = time.perf_counter(), 0.0

        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
            logger.log({"step": step, **evaluate(module, collator, data.validation, cfg, accelerator)}, prefix="eval")
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            save_checkpoint(accelerator, ckpt_root, step, dict(state, config=config_to_dict(cfg)), t.keep_last)

    final = evaluate(module, collator, data.validation, cfg, accelerator)
    logger.log({"step": step, **final}, prefix="eval")
    accelerator.print("final validation: " + json.dumps({k: round(v, 4) for k, v in final.items()}))
    if accelerator.is_main_process:
        export_dir = out / "export"
        trained = unwrap(module).model
        objective.export(trained, export_dir, tokenizer)
        save_config(cfg, export_dir / "pretrain_config.yaml")
        sample = torch.stack([data.validation[i]["input_ids"] for i in range(min(2, len(data.validation)))])
        for path, auto_class, reference in objective.export_targets(trained, export_dir):
            check = roundtrip_check(path, auto_class, reference.float().cpu(), sample)
            accelerator.print(f"exported {path}: reloaded as {check['class']} in a fresh process, "
                              f"max |logit difference| {check['max_abs_err']:.2e}")
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


__all__ = ["fit", "evaluate", "accumulate_gradients", "build_optimizer", "PretrainModule", "RunDirError", "CheckpointError"]
