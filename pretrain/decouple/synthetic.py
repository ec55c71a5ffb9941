"""Synthetic gradients at chunk boundaries (DESIGN.md §4, ``decouple.mode: synthetic``; DNI, Jaderberg et al. 2017;
cDNI conditioning, Czarnecki et al. 2017).

Chunk k < K-1 has no loss of its own: it backpropagates ``M_k(h, context)``, a prediction of dL/dh for its output
h [B, L, H], right after its forward pass. Chunk k+1 sends the true gradient δ of its input back; when δ for
micro-batch t arrives (at most S = ``staleness`` micro-batches later), chunk k trains M_k on ``||M_k(h) − δ·c||²``
(δ detached; c: see ``target_scale``) and, with ``mix`` λ > 0, updates itself from ``λ·δ + (1−λ)·prediction``
if δ arrives before its optimizer step (it keeps micro-batch t's graph until then).
During ``warmup_steps`` the chunk waits for δ and uses it alone. The last chunk trains on the objective's loss.
Against the collapse of chunk k's outputs onto one vector (DESIGN.md §4), ``center`` removes the per-block mean of
the prediction over the masked positions, and ``collapse_penalty`` β adds β × token cosine of h to chunk k's loss;
``chunk{k}_sg_cos_context`` logs the cosine at the positions without a target alone.
Invariants: S = 0 and λ = 1 is backprop; an M_k that returns zero leaves chunk k at its initialisation (with
weight decay 0: AdamW's decoupled decay shrinks weights even without a gradient).

:class:`SyntheticStage` adds this to the pipeline's ``Stage``; the pipeline routes
its ``outbox`` (true gradients of its input, in micro-batch order) to the chunk below, and calls ``resolve`` when a
true gradient is due. M_k runs in fp32 with autocast off: it is small, and its regression target is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from objectives.backbones import backbone_of
from objectives.base import IGNORE_INDEX, bert_init_

from ..checkpoint import load_tensors, loading
from .stage import Stage


@dataclass
class SyntheticConfig:
    """Synthetic-gradient modules of ``decouple.mode: synthetic`` (DNI; Jaderberg et al. 2017, Czarnecki et al. 2017):
    at every boundary k, M_k(h, context) predicts dL/dh for chunk k's output h [B, L, H]."""

    context: Literal["labels", "none"] = "labels"
    """labels = cDNI: M_k also sees an embedding of each position's target id (its own table; "no target" at
    unmasked positions); none = h only (given h alone the expected MLM gradient is ~0, DESIGN.md §4)."""
    arch: Literal["linear", "mlp", "layer"] = "mlp"
    """M_k's body before its zero-initialised output projection: none (linear), dense 2H + GeLU (mlp), or one
    transformer layer over the sequence (layer)."""
    lr: float = 1.0e-3
    """Constant learning rate of M_k's own AdamW (no weight decay)."""
    target_scale: Literal["rms", "count", "none"] = "rms"
    """What M_k regresses (its output is divided back before use). count: dL/dh × the window's masked-token count
    (the gradient of the summed, not averaged, loss: independent of the batch size); rms: that, divided by its
    running RMS (EMA 0.99), so targets are O(1) per element whatever the model width or decoder scale; none:
    dL/dh itself (~1e-5 per element: Adam-trained M_k overshoots such tiny targets)."""
    warmup_steps: int = 0
    """Optimizer steps at the start during which chunks 0..K-2 wait for and use the true gradient (M_k trains)."""
    mix: float = 0.0
    """λ: when the true gradient δ of a micro-batch arrives before the chunk's optimizer step, the chunk updates
    from λ·δ + (1-λ)·prediction (it keeps that micro-batch's graph until then); 0 = prediction only."""
    staleness: int = 1
    """S: chunk k runs at most S micro-batches ahead of the true gradients from chunk k+1 (it must receive the
    gradient of micro-batch t-S after computing t). S=0 with mix=1 is backprop."""
    center: bool = False
    """Remove, per block, the mean of the prediction over the positions that carry a target (labels != -100)
    from the prediction at those positions before it is used: the component shared by all of a block's tokens,
    which pulls them towards one vector (the collapse of DESIGN.md §4). The true gradient's shared part is dropped
    with it (about a tenth of its energy at masked positions in our runs)."""
    collapse_penalty: float = 0.0
    """β: chunk k also minimises β × the mean token-to-token cosine of its output (``chunk{k}_token_cos``, 1 = every
    token of a block on one vector), a local regulariser against the collapse; 0 = off."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"decouple.synthetic.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"decouple.synthetic.mix (λ, weight of the true gradient) must be in [0, 1], "
                             f"got {self.mix}")
        if self.collapse_penalty < 0:
            raise ValueError(f"decouple.synthetic.collapse_penalty must be >= 0, got {self.collapse_penalty}")
        for name in ("warmup_steps", "staleness"):
            if getattr(self, name) < 0:
                raise ValueError(f"decouple.synthetic.{name} must be >= 0, got {getattr(self, name)}")


#: checkpoint file of M_k (per chunk directory) and export file of all of them (beside the HF weights)
SYNTHETIC_FILE, SYNTHETIC_EXPORT_FILE = "synthetic.safetensors", "synthetic_gradients.safetensors"


class SyntheticGradient(nn.Module):
    """M_k: (h [B, L, H] fp32, labels [B, L], the chunk's layer context) -> predicted scaled dL/dh [B, L, H] fp32.

    Input: h, concatenated with a LayerNorm'd embedding of the target id when ``context == "labels"`` (own table
    initialised from the word embeddings, whose copy is the last chunk's decoder; one extra row for "no target").
    Body: ``arch`` (linear: none; mlp: dense 2H + GeLU; layer: dense to H + one transformer layer of the model's arch
    without dropout).
    The output projection starts at zero, so M_k first predicts "no gradient" (the frozen lower chunk)."""

    def __init__(self, config, arch: str, context: str, word_embeddings: torch.Tensor):
        super().__init__()
        h = config.hidden_size
        self.arch = arch
        self.embed = self.embed_norm = None
        if context == "labels":
            self.embed = nn.Embedding(config.vocab_size + 1, h)
            self.embed_norm = nn.LayerNorm(h)
        width = 2 * h if context == "labels" else h
        self.body: nn.Module | None = None
        if arch == "mlp":
            self.body = nn.Sequential(nn.Linear(width, 2 * h), nn.GELU())
            width = 2 * h
        elif arch == "layer":
            backbone = backbone_of(config)
            self.run_layer = backbone.runner_class.run  # with the chunk's layer context
            # no dropout, so no RNG draws: runtime-independent
            self.proj, self.body = nn.Linear(width, h), backbone.extra_layer(config, dropout=False)
            width = h
        self.out = nn.Linear(width, h)
        bert_init_(self, config.initializer_range)
        if self.embed is not None:
            with torch.no_grad():
                self.embed.weight[:-1].copy_(word_embeddings)
                self.embed.weight[-1].normal_(std=config.initializer_range)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, mask) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.float()
            if self.embed is not None:
                ids = torch.where(labels == IGNORE_INDEX, self.embed.num_embeddings - 1, labels)
                x = torch.cat([x, self.embed_norm(self.embed(ids))], dim=-1)
            if self.arch == "mlp":
                x = self.body(x)
            elif self.arch == "layer":
                x = self.run_layer(self.body, self.proj(x), mask)
            return self.out(x)


def token_cosine(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cosine between the output vectors of a block's tokens (all pairs of non-pad tokens, self-pairs included),
    averaged over the blocks of hidden [B, L, H]: 1 = every token collapsed onto one vector (DESIGN.md §4: what
    drives a synthetic-gradient run below the frozen control). Computed as ||mean of unit vectors||², O(B·L·H);
    differentiable (``synthetic.collapse_penalty``): detach ``hidden`` to log it."""
    valid = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask.float()
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1) * valid[..., None]
    mean = unit.sum(1) / valid.sum(1).clamp(min=1)[:, None]
    return mean.pow(2).sum(-1).mean()


def center_on_targets(grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``grad`` [B, L, H] minus, at the positions with a target (labels [B, L] != -100), the mean of ``grad`` over
    those positions of its block; other positions unchanged (``synthetic.center``)."""
    targets = (labels != IGNORE_INDEX).unsqueeze(-1).to(grad.dtype)
    mean = (grad * targets).sum(1, keepdim=True) / targets.sum(1, keepdim=True).clamp(min=1)
    return grad - mean * targets


@dataclass
class Pending:
    """A micro-batch whose true output gradient chunk k still awaits. ``hidden``/``loss``/``leaf`` hold its graph
    until the chunk backpropagates it (None after); ``features`` is h detached [B, L, H] (M_k's input, again when
    it trains); ``prediction`` the unscaled dL/dh that was (or will be) used; ``count`` the window's masked count
    (1 with ``target_scale: none``)."""

    index: int
    hidden: torch.Tensor | None
    loss: torch.Tensor | None
    leaf: torch.Tensor | None
    features: torch.Tensor
    labels: torch.Tensor
    mask: object
    prediction: torch.Tensor
    count: torch.Tensor


class SyntheticStage(Stage):
    """A chunk of ``decouple.mode: synthetic``: learns from predicted (and true) gradients of its output, on top of
    :class:`~pretrain.decouple.stage.Stage` (its optimizer, clipping, RNG and checkpoint files)."""

    def __init__(self, model, k: int, cfg, device: torch.device, replica: int = 0):
        if cfg.train.precision == "fp16":
            raise NotImplementedError("decouple.mode=synthetic does not implement fp16 loss scaling of the "
                                      "gradients it exchanges: use train.precision bf16 or fp32")
        super().__init__(model, k, cfg, device, replica)
        self.options = cfg.decouple.synthetic
        #: count whose window total scales the target (``Objective.synthetic_count_key``, e.g. the masked count)
        self.scale_key = model.objective.synthetic_count_key
        self.module: SyntheticGradient | None = None if self.chunk.is_final else model.synthetic[k]
        self.sg_optimizer = None
        if self.module is not None:
            self.sg_optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.options.lr, weight_decay=0.0)
            names = {f"chunk{k}_sg_{m}": f"n_sg{k}" for m in ("loss", "cos", "cos_context", "norm_ratio")}
            names[f"chunk{k}_token_cos"] = f"n_out{k}"
            self.tracker.metric_counts = {**self.tracker.metric_counts, **names}
        self.cfg = cfg
        self.use_true = False  # warm-up: wait for the true gradient and use it alone
        self.seen = 0
        #: running RMS of δ·c (``target_scale: rms``): M_k's targets are δ·c / target_rms, O(1) per element
        self.target_rms: torch.Tensor | None = None

    requires = ("split_config", "layers", "layer_runner", "stem", "final_head", "input_embeddings",
                "synthetic_count_key")
    needs = " (its modules condition on masked-token labels)"

    @staticmethod
    def aux_heads(objective, model, config, decouple_cfg) -> list[nn.Module]:
        """No local losses: chunks 0..K-2 learn from the predicted gradient of their output."""
        return []

    @staticmethod
    def boundary_modules(objective, model, config, decouple_cfg) -> list[nn.Module]:
        """M_0..M_{K-2}, their label tables initialised from the objective's input word embeddings."""
        s = decouple_cfg.synthetic
        words = objective.input_embeddings(model).detach()
        return [SyntheticGradient(config, s.arch, s.context, words) for _ in range(decouple_cfg.chunks - 1)]

    @staticmethod
    def messages_down(cfg) -> int:
        """Up to S+1 true gradients travel down while activations travel up."""
        return 2 * (cfg.decouple.synthetic.staleness + 1)

    def begin_window(self, step: int | None) -> bool:
        """Warm-up steps use the true gradient alone; they, checkpoint steps and the last step (``train.max_steps``, or
        ``decouple.until_step`` where the run switches to backprop) drain the window."""
        if step is None:
            return False
        t = self.cfg.train
        self.use_true = step < self.options.warmup_steps
        last = step + 1 in (t.max_steps, self.cfg.decouple.until_step)  # the decoupled phase's last step
        return self.use_true or last or bool(t.save_every and (step + 1) % t.save_every == 0)

    # ------------------------------------------------------------------ one micro-batch
    def forward_backward(self, batch, inputs, normalizers, autocast) -> dict[str, torch.Tensor]:
        leaf = None
        with self.rng.active():
            if self.k > 0:
                leaf = inputs["hidden"].detach().requires_grad_()
                inputs = {**inputs, "hidden": leaf}
            with autocast():
                outputs, out = self.chunk(batch, inputs, normalizers, boundary_grads=True)
        hidden, loss = outputs["hidden"], out["loss"]
        self.tracker.add(out)
        if self.module is None:  # the last chunk: the objective's loss
            loss.backward()
            self._emit(leaf)
        else:
            features = hidden.detach()
            mask = self.chunk.attention_mask(features, batch)
            count = normalizers[self.scale_key].clamp(min=1) if self.options.target_scale != "none" else \
                torch.ones((), device=features.device)
            with torch.no_grad():
                prediction = self.module(features, batch["labels"], mask) / self._scale(count)
                if self.options.center:
                    prediction = center_on_targets(prediction, batch["labels"])
            spread = token_cosine(hidden if self.options.collapse_penalty else features, batch.get("attention_mask"))
            if self.options.collapse_penalty:
                penalty = self.options.collapse_penalty * spread
                loss = penalty if loss is None else loss + penalty
            entry = Pending(self.seen, hidden, loss, leaf, features, batch["labels"], mask, prediction, count)
            self.tracker.add({f"chunk{self.k}_token_cos": spread.detach(),
                              f"n_out{self.k}": torch.ones((), device=features.device)})
            if not (self.use_true or self.options.mix > 0):
                self._backward(entry, prediction)
            self.pending.append(entry)
        self.seen += 1
        return {**outputs, "hidden": hidden.detach()}

    def _scale(self, count: torch.Tensor) -> torch.Tensor:
        """M_k's output = dL/dh × this factor (see ``synthetic.target_scale``)."""
        if self.options.target_scale == "rms" and self.target_rms is not None:
            return count / self.target_rms
        return count

    def _backward(self, entry: Pending, grad: torch.Tensor) -> None:
        """Backpropagate ``grad`` into the chunk's output (plus its own loss, if any); free the graph."""
        tensors, grads = [entry.hidden], [grad]
        if entry.loss is not None:
            tensors.append(entry.loss)
            grads.append(None)
        torch.autograd.backward(tensors, grads)
        self._emit(entry.leaf)
        entry.hidden = entry.loss = entry.leaf = None

    def _emit(self, leaf: torch.Tensor | None) -> None:
        if leaf is not None:
            self.outbox.append(leaf.grad.detach())

    # ------------------------------------------------------------------ true gradients
    def due(self) -> int:
        """How many pending micro-batches must get their true gradient now (index <= newest - S)."""
        newest = self.seen - 1
        return sum(1 for e in self.pending if e.index <= newest - self.options.staleness)

    def next_shape(self) -> torch.Size:
        return self.pending[0].features.shape

    def resolve(self, delta: torch.Tensor) -> None:
        """The true gradient δ of the oldest pending micro-batch's output: update the chunk if its graph is still
        held (warm-up: δ; else λ·δ + (1−λ)·prediction), then one step of M_k on ||M_k(h) − δ·c||²."""
        entry = self.pending.popleft()
        if entry.hidden is not None:
            lam = 1.0 if self.use_true else self.options.mix
            self._backward(entry, delta if lam == 1.0 else lam * delta + (1.0 - lam) * entry.prediction)
        if self.options.target_scale == "rms":
            rms = (delta.float() * entry.count).pow(2).mean().sqrt().clamp(min=1e-30)
            self.target_rms = rms if self.target_rms is None else 0.99 * self.target_rms + 0.01 * rms
        target = delta.float() * self._scale(entry.count)
        predicted = self.module(entry.features, entry.labels, entry.mask)
        sg_loss = (predicted - target).pow(2).sum(-1).mean()
        if torch.isfinite(sg_loss):
            sg_loss.backward()
            self.sg_optimizer.step()
        self.sg_optimizer.zero_grad(set_to_none=True)
        used, true = entry.prediction.float(), delta.float()
        cos = torch.nn.functional.cosine_similarity
        context = (entry.labels == IGNORE_INDEX).unsqueeze(-1)  # positions without a target
        one = torch.ones((), device=delta.device)
        self.tracker.add({f"chunk{self.k}_sg_loss": sg_loss.detach(), f"n_sg{self.k}": one,
                          f"chunk{self.k}_sg_cos": cos(used.flatten(), true.flatten(), dim=0),
                          f"chunk{self.k}_sg_cos_context": cos((used * context).flatten(), (true * context).flatten(),
                                                               dim=0),
                          f"chunk{self.k}_sg_norm_ratio": used.norm() / true.norm().clamp(min=1e-30)})

    def release_graphs(self) -> None:
        """Before the optimizer step: micro-batches whose true gradient did not arrive in time use the prediction."""
        for entry in self.pending:
            if entry.hidden is not None:
                self._backward(entry, entry.prediction)

    # ------------------------------------------------------------------ checkpoints: M_k and its optimizer
    def save(self, directory: Path) -> None:
        super().save(directory)
        if self.module is None:
            return
        if self.pending:
            raise RuntimeError(f"chunk {self.k} saves with {len(self.pending)} true gradients outstanding: "
                               "the pipeline drains before a checkpoint")
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                  str(directory / SYNTHETIC_FILE))
        torch.save({"optimizer": self.sg_optimizer.state_dict(), "target_rms": self.target_rms},
                   directory / "synthetic_state.pt")

    def load(self, directory: Path) -> None:
        super().load(directory)
        if self.module is None:
            return
        from safetensors.torch import load_file

        path = directory.parent
        with loading(path, directory / SYNTHETIC_FILE):
            self.module.load_state_dict(load_file(str(directory / SYNTHETIC_FILE)))
        state = load_tensors(path, directory / "synthetic_state.pt")  # weights_only: tensors and plain types
        with loading(path, directory / "synthetic_state.pt"):
            self.sg_optimizer.load_state_dict(state["optimizer"])
            self.target_rms = state["target_rms"]

__all__ = ["SyntheticGradient", "token_cosine", "center_on_targets", "SyntheticStage", "SYNTHETIC_FILE",
           "SYNTHETIC_EXPORT_FILE"]
