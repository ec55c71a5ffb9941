"""The training loop: one explicit function, ``fit(cfg)``, for every way of taking a step.

Per optimizer step: the LR of the step (a function of it) → fetch this process's micro-batches → the step strategy
takes the step (``pretrain/steps/``: end-to-end backprop under accelerate, or the decoupled chunk pipeline) →
log / evaluate / checkpoint at their cadences. After the strategy's ``switch_at`` step (``decouple.until_step``) the
loop logs that step, lets the strategy switch (decoupled → backprop of the stitched model) and reads on from the
stream with the strategy's new per-process share: one loop, one LR schedule, one global batch. Everything around the step exists once, here: the run directory,
data, tokenizer, resume, the loader, throughput and MFU, the metrics log and console progress, evaluation,
checkpoint cadence and the final export. A strategy may return None from ``window_metrics``/``evaluate`` on
processes that hold no metrics, and only its ``is_logger`` process logs, prints and exports: nothing here assumes a
collective.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .config import Config, config_to_dict
from .data.stream import StreamDataset, make_loader
from .ewc import resolve_source
from .export import write_export
from .metrics import MetricsLogger, peak_flops, train_flops_per_token, weighted_loss
from .rundir import check_tokenizer, prepare_run_dir, run_dir_lock, save_run_config
from .schedules import lr_for
from .steps import build_step, seed_everything


def setup(cfg: Config, step_runner, out_dir: Path, data=None):
    """Seed, prepare the data (main process first; ``data``: already prepared blocks), fit the tokenizer, build
    the objective, its CPU copy for the data loaders, and the strategy's model(s). Returns ``(data, tokenizer,
    objective, collator, model)`` (``model``: the stock model, for MFU)."""
    seed_everything(cfg.train.seed)
    if data is None:
        from .data import prepare_blocks

        data = step_runner.main_first(lambda: prepare_blocks(cfg))
    tokenizer = check_tokenizer(cfg, data.tokenizer)
    objective = cfg.objective.build(tokenizer, cfg.train.seed, getattr(data, "unigram_counts", None))
    collator = copy.deepcopy(objective)  # a CPU copy for DataLoader workers; the trained one moves to the device
    model = step_runner.build(objective, collator, out_dir, tokenizer)
    return data, tokenizer, objective, collator, model


def train_loader(cfg: Config, step_runner, collator, data, start_step: int):
    """This process's share of the training stream from optimizer step ``start_step`` (O(1) resume), in the
    strategy's micro-batches (``step_runner.micro_batch_size`` × ``grad_accum`` per step)."""
    t, s = cfg.train, step_runner
    return make_loader(StreamDataset(data.train, t.seed), collator.collate, s.micro_batch_size, s.replicas,
                       s.replica_index, start=start_step * s.grad_accum, stop=None,
                       num_workers=cfg.data.num_workers, pin_memory=step_runner.device.type == "cuda")


def rounded(metrics: dict) -> dict:
    """Metrics for the console: 4 decimals, without the target counts (``n_*``)."""
    return {k: round(v, 4) for k, v in metrics.items() if not k.startswith("n_")}


def start_banner(cfg: Config, step_runner) -> str:
    """One line: processes, device, precision, global batch (blocks and tokens per step) and steps."""
    t, s = cfg.train, step_runner
    blocks = s.replicas * s.grad_accum * s.micro_batch_size
    return (f"training: {s.world_size} process(es) ({s.replicas} data-parallel), device "
            f"{s.device.type}, precision {t.precision}, global batch {blocks} blocks = "
            f"{blocks * cfg.data.block_size} tokens per step ({s.replicas} x {s.grad_accum} accumulated "
            f"x {s.micro_batch_size}), {t.max_steps} steps")


def fit(cfg: Config, overwrite: bool = False, data=None) -> dict:
    """Train ``cfg`` to ``cfg.train.max_steps``, resuming from the newest checkpoint in ``cfg.output_dir``, then
    export. ``data``: prepared blocks (``tokenizer``, ``train``, ``validation``, ``unigram_counts``) instead of
    ``prepare_blocks(cfg)`` (tests). Returns the final validation metrics ({} on processes that hold none)."""
    cfg = resolve_source(cfg)  # continued pretraining (train.ewc.source): checked before anything is written
    step_runner = build_step(cfg)  # launches or joins the processes, picks the device
    with run_dir_lock(cfg.output_dir, step_runner.is_main):  # one run per output_dir; released on any exit
        return fit_locked(cfg, step_runner, overwrite, data)


def fit_locked(cfg: Config, step_runner, overwrite: bool, data) -> dict:
    """``fit``'s body under the run directory's lock."""
    t = cfg.train
    out = prepare_run_dir(cfg, overwrite, step_runner.is_main)
    step_runner.barrier()
    data, tokenizer, objective, collator, model = setup(cfg, step_runner, out, data)
    if step_runner.is_main:  # the checks passed: the run starts, and its config now binds the directory
        save_run_config(cfg, out)
        tokenizer.save_pretrained(str(out / "tokenizer"))

    state = {"step": 0, "tokens": 0}
    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = step_runner.load(resume)
        if step_runner.is_logger:
            print(f"resumed from {resume} (step {state['step']})", flush=True)

    # the same on both sides of a switch (the strategy keeps the global batch)
    tokens_per_step = step_runner.replicas * step_runner.grad_accum * step_runner.micro_batch_size * \
        cfg.data.block_size
    if step_runner.is_logger:
        print(start_banner(cfg, step_runner), flush=True)
    batches = iter(train_loader(cfg, step_runner, collator, data, state["step"]))
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    flops_per_step = tokens_per_step * train_flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size,
                                                             cfg.data.block_size)
    device = step_runner.device
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    logger = MetricsLogger(out, step_runner.is_logger, cfg.log.tensorboard, t.max_steps,
                           resumed_at=state["step"] if resume else None)
    logger.log({"event": "resume" if resume else "start", "step": state["step"], "world_size": step_runner.world_size,
                **step_runner.describe(), "config": config_to_dict(cfg)}, prefix="run")

    def log_eval(at_step: int) -> dict | None:
        metrics = step_runner.evaluate(data.validation)
        if metrics is not None:
            logger.log({"step": at_step, **metrics}, prefix="eval")
            if step_runner.is_logger and at_step != t.max_steps:  # the final one is printed below
                print(f"eval step {at_step}: " + json.dumps(rounded(metrics)), flush=True)
        return metrics

    if state["step"] == 0 and t.eval_every:
        log_eval(0)
    step, window_start, data_wait, window_steps, skipped_logged = state["step"], time.perf_counter(), 0.0, 0, 0
    last_checkpoint = resume
    while step < t.max_steps:
        lr = lr_for(t, step)
        fetch_start = time.perf_counter()
        micro = [next(batches) for _ in range(step_runner.grad_accum)]
        data_wait += time.perf_counter() - fetch_start
        step_runner.train_step(micro, lr, step)
        step += 1
        window_steps += 1
        state.update(step=step, tokens=state["tokens"] + tokens_per_step)

        if step % t.log_every == 0 or step == t.max_steps or step == step_runner.switch_at:
            metrics = step_runner.window_metrics()
            if metrics is not None:
                elapsed = time.perf_counter() - window_start
                grad_norm, skipped = metrics.pop("grad_norm"), metrics.pop("skipped_steps")
                if skipped > skipped_logged and step_runner.is_logger:
                    print(f"step {step}: {skipped - skipped_logged} update(s) skipped on a non-finite gradient "
                          "norm since the last log", flush=True)
                skipped_logged = skipped
                record = {"step": step, "lr": lr, "tokens": state["tokens"],
                          "tok_per_s": tokens_per_step * window_steps / elapsed, "grad_norm": grad_norm,
                          "skipped_steps": skipped,
                          "mfu": flops_per_step * window_steps / elapsed / (peak * step_runner.world_size)
                          if peak else None,
                          "data_wait": data_wait / elapsed, **metrics}
                record["loss"] = weighted_loss(objective.loss_parts, record)
                logger.log(record)
                logger.progress(record, elapsed / window_steps)
            window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0

        if step == step_runner.switch_at:  # its window was just logged; the next step is taken the new way
            step_runner.switch()
            batches = iter(train_loader(cfg, step_runner, collator, data, step))
            skipped_logged = 0  # the new strategy counts its own skipped updates
            logger.log({"event": "switch", "step": step, **step_runner.describe()}, prefix="run")
            if step_runner.is_logger:
                print(f"step {step}: switched to {step_runner.describe().get('phase')}; "
                      + start_banner(cfg, step_runner), flush=True)

        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
            log_eval(step)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            last_checkpoint = step_runner.save(ckpt_root, step, dict(state, config=config_to_dict(cfg)), t.keep_last)

    final = log_eval(step)
    if final is not None and step_runner.is_logger:
        print("final validation: " + json.dumps(rounded(final)), flush=True)
    exported = step_runner.export_model(Path(last_checkpoint))
    if exported is not None:  # the logging process: export, and reload the export in a fresh process
        trained, sidecars = exported
        sample = torch.stack([torch.as_tensor(data.validation[i]["input_ids"])
                              for i in range(min(2, len(data.validation)))])
        write_export(objective, trained, out / "export", tokenizer, cfg, sidecars, sample)
    logger.close()
    step_runner.close()
    return final or {}
