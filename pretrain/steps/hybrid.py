"""Local, then backprop (``decouple.until_step: N``; a suggestion read in Laskin et al. 2020, "Parallel training of
deep networks with local updates": start with local updates, finish end to end): the decoupled pipeline takes steps
1..N, then the stitched model (the one the export writes) trains by end-to-end backprop from step N+1 to
``train.max_steps``.

The switch (:meth:`HybridStep.switch`, called by the loop after step N has been logged):

* **Model.** The stitched model is the ``ChunkedModel``'s own ``model`` + ``objective`` (e.g. SpanBERT's SBO head):
  the very tensors the chunks trained (no second model is built). Distributed (W = D × K processes, each
  holding one chunk), pipeline 0's holder of chunk k (rank k) broadcasts chunk k's tensors to every process first.
* **Optimizer.** One AdamW over the stitched model (``pretrain.optim.build_optimizer``, the hyperparameters every
  chunk's AdamW used); each parameter's ``exp_avg``, ``exp_avg_sq`` and ``step`` come from the chunk optimizer
  that owned it (a frozen chunk's, ``decouple.freeze_lower``, start empty). The auxiliary heads, synthetic-gradient
  modules and their optimizers are dropped; an fp16 loss scale restarts (accelerate's scaler).
* **Schedule.** Every chunk stepped at ``lr_for(train, step)``: the backprop phase continues that one schedule over
  ``train.max_steps`` (one-cycle's beta1 included).
* **RNG.** The global generators are reseeded from ``train.seed + N`` (the backprop phase's dropout), so a run
  resumed before the switch draws what the uninterrupted one draws.
* **Batch.** The global batch stays D × ``grad_accum`` × ``micro_batch_size`` blocks, the same stream positions per
  step. W processes become W data-parallel replicas of the whole model (accelerate, DDP); each takes 1/K of its
  pipeline's share: ``micro_batch_size / K`` blocks per micro-batch, else ``grad_accum / K`` micro-batches (refused
  at launch when K divides neither). Token-exact normalisers make the gradient the same up to fp rounding.

Checkpoints: up to step N-1 they are the decoupled run's (``chunk{k}/``); from step N on they are backprop
checkpoints of the stitched model (``model.safetensors``, ``optimizer.bin``, RNG) whose trainer state says
``"phase": "backprop"``; :meth:`HybridStep.load` switches before it loads one, so each side resumes exactly.
The process that logged the decoupled phase (the last chunk of pipeline 0) keeps logging and exports.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import PHASE_KEY, read_state
from ..fast import fast_enabled
from .backprop import BackpropStep
from .base import LaunchError, StepStrategy, seed_everything
from .decoupled import DecoupledStep


def backprop_share(cfg, chunks: int, runtime: str) -> tuple[int, int]:
    """``(grad_accum, micro_batch_size)`` of each process after the switch, keeping the global batch: a distributed
    pipeline's K processes split its share (micro-batches of b/K blocks, else A/K micro-batches); simulated: as is."""
    t = cfg.train
    if runtime != "distributed" or chunks == 1:
        return t.grad_accum, t.micro_batch_size
    if t.micro_batch_size % chunks == 0:
        return t.grad_accum, t.micro_batch_size // chunks
    if t.grad_accum % chunks == 0:
        return t.grad_accum // chunks, t.micro_batch_size
    raise LaunchError(f"decouple.until_step: after the switch the {chunks} processes of each pipeline share its "
                      f"batch, so train.micro_batch_size ({t.micro_batch_size}) or train.grad_accum "
                      f"({t.grad_accum}) must be a multiple of decouple.chunks ({chunks})")


def stitched_state(step: DecoupledStep) -> dict[int, dict[str, torch.Tensor]]:
    """Every chunk's tensors on this process (broadcast from pipeline 0's holder of each chunk when distributed) and
    the AdamW state of every parameter the chunk optimizers had stepped: ``id(parameter) -> {"step", "exp_avg",
    "exp_avg_sq"}``. One flat fp32 message per chunk: per parameter its values, exp_avg, exp_avg_sq (numel each)
    and its step count (0 = never stepped: no state)."""
    model, layout = step.model, step.layout
    stages = {stage.k: stage for stage in step.pipeline.stages}
    states = {}
    for k in range(model.num_chunks):
        params = model.chunk_parameters(k)
        stage = stages.get(k)
        if stage is not None:
            adam = stage.optimizer.state if stage.optimizer is not None else {}
            parts = []
            for p in params:
                s = adam.get(p)
                if s:
                    parts += [p.detach().reshape(-1), s["exp_avg"].reshape(-1), s["exp_avg_sq"].reshape(-1),
                              s["step"].reshape(1).to(p.device, torch.float32)]
                else:
                    parts += [p.detach().reshape(-1), torch.zeros(2 * p.numel() + 1, device=p.device)]
            flat = torch.cat([x.float() for x in parts])
        else:
            flat = torch.empty(sum(3 * p.numel() + 1 for p in params), device=step.device)
        if layout.runtime == "distributed":
            import torch.distributed as dist

            dist.broadcast(flat, src=k)  # rank = dp_index * K + chunk: pipeline 0 holds chunk k on rank k
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                values, exp_avg, exp_avg_sq = flat[offset:offset + 3 * n].split(n)
                count = flat[offset + 3 * n]
                offset += 3 * n + 1
                p.copy_(values.view_as(p))
                if count > 0:
                    states[id(p)] = {"step": count.cpu().clone(), "exp_avg": exp_avg.view_as(p).clone(),
                                     "exp_avg_sq": exp_avg_sq.view_as(p).clone()}
    return states


def load_adam_state(optimizer, states: dict[int, dict[str, torch.Tensor]]) -> None:
    """Give each parameter of ``optimizer`` (AdamW, possibly accelerate-wrapped) its state from ``states``
    (``id(parameter) -> state``); parameters without one start fresh. ``load_state_dict`` places the step counts
    where the optimizer keeps them (on the device for a fused AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    state_dict = inner.state_dict()
    state_dict["state"] = {i: states[id(p)] for i, p in enumerate(params) if id(p) in states}
    inner.load_state_dict(state_dict)


class HybridStep(StepStrategy):
    """The decoupled phase (:class:`DecoupledStep`) until ``decouple.until_step``, then a :class:`BackpropStep` of
    the stitched model; see the module docstring. ``phase`` is the strategy taking the steps now."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.decoupled = self.phase = DecoupledStep(cfg)
        layout = self.decoupled.layout
        self.after = backprop_share(cfg, layout.chunks, layout.runtime)  # refused here, at launch, if impossible
        self.switch_at = cfg.decouple.until_step
        self.device, self.world_size = self.decoupled.device, self.decoupled.world_size
        self.is_main, self.is_logger = self.decoupled.is_main, self.decoupled.is_logger
        self.closed = False
        self._share()

    def _share(self) -> None:
        """This process's share of the stream: the current phase's."""
        p = self.phase
        self.replicas, self.replica_index = p.replicas, p.replica_index
        self.grad_accum, self.micro_batch_size = p.grad_accum, p.micro_batch_size

    def barrier(self) -> None:
        self.phase.barrier()

    def build(self, objective, collator, out_dir: Path, tokenizer) -> nn.Module:
        self.collator = collator
        return self.decoupled.build(objective, collator, out_dir, tokenizer)

    def describe(self) -> dict:
        phase = "decoupled" if self.phase is self.decoupled else "backprop"
        return {**self.decoupled.describe(), "until_step": self.switch_at, "phase": phase}

    def switch(self) -> None:
        if self.phase is not self.decoupled:
            raise RuntimeError("the hybrid run has switched to backprop already")
        d = self.decoupled
        d.pipeline.close()  # no message of the decoupled phase left in flight
        states = stitched_state(d)
        probe = d.pipeline.probe  # the same texts probe the stitched model's layers from now on
        d.pipeline = None  # its chunk optimizers' moments now live in ``states``
        seed_everything(self.cfg.train.seed + self.switch_at)  # dropout after the switch: not the decoupled history
        bp = BackpropStep(self.cfg)  # joins the launch's process group (the decoupled phase formed it)
        bp.is_logger = self.is_logger  # the logger opened on the decoupled phase's logging process
        bp.grad_accum, bp.micro_batch_size = self.after
        bp.prepare(d.model.model, d.model.objective, self.collator,
                   compile=fast_enabled(self.cfg.model, self.device))  # chunks' fast path: the model is fused
        load_adam_state(bp.optimizer, states)
        bp.probe = probe
        self.phase = bp
        self._share()

    def train_step(self, micro_batches: list[dict], lr: float, step: int) -> None:
        self.phase.train_step(micro_batches, lr, step)

    def window_metrics(self) -> dict[str, float] | None:
        return self.phase.window_metrics()

    def evaluate(self, val_blocks) -> dict[str, float] | None:
        return self.phase.evaluate(val_blocks)

    def save(self, root: Path, step: int, state: dict, keep_last: int) -> Path:
        if self.phase is not self.decoupled:
            state = dict(state, **{PHASE_KEY: "backprop"})
        return self.phase.save(root, step, state, keep_last)

    def load(self, path: Path) -> dict:
        """A checkpoint of either phase; a backprop one switches first (the stitched model and its optimizer are
        then overwritten by the checkpoint's)."""
        if read_state(path).get(PHASE_KEY) == "backprop" and self.phase is self.decoupled:
            self.switch()
        return self.phase.load(path)

    def export_model(self, checkpoint: Path) -> tuple[nn.Module, dict] | None:
        """The stitched model (``Objective.export_copy``, as a decoupled export), on the logging process, after every
        process has left the group: ``save_pretrained`` writes nothing on ranks other than 0 of a live group. No
        sidecar files: the auxiliary heads and synthetic-gradient modules were dropped at the switch."""
        self.phase.close()  # waits for every process, then leaves the process group
        self.closed = True
        if not self.is_logger:
            return None
        return self.decoupled.model.export_model().float().cpu(), {}

    def close(self) -> None:
        if not self.closed:
            self.phase.close()
