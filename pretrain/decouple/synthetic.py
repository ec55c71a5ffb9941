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

:class:`SyntheticStageMixin` adds this to the runtime's ``Stage``; the pipeline routes
its ``outbox`` (true gradients of its input, in micro-batch order) to the chunk below, and calls ``resolve`` when a
true gradient is due. M_k runs in fp32 with autocast off: it is small, and its regression target is fp32.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from objectives.base import IGNORE_INDEX, bert_init_

#: checkpoint file of M_k (per chunk directory) and export file of all of them (beside the HF weights)
SYNTHETIC_FILE, SYNTHETIC_EXPORT_FILE = "synthetic.safetensors", "synthetic_gradients.safetensors"


class SyntheticGradient(nn.Module):
    """M_k: (h [B, L, H] fp32, labels [B, L], layer attention mask) -> predicted scaled dL/dh [B, L, H] fp32.

    Input: h, concatenated with a LayerNorm'd embedding of the target id when ``context == "labels"`` (own table
    initialised from the word embeddings, whose copy is the last chunk's decoder; one extra row for "no target").
    Body: ``arch`` (linear: none; mlp: dense 2H + GeLU; layer: dense to H + one transformer layer without dropout).
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
            from transformers.models.bert.modeling_bert import BertLayer

            quiet = copy.deepcopy(config)
            quiet.hidden_dropout_prob = quiet.attention_probs_dropout_prob = 0.0  # no RNG draws: runtime-independent
            self.proj, self.body = nn.Linear(width, h), BertLayer(quiet)
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
                x = self.body(self.proj(x), mask)
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


class NoHead(nn.Module):
    """Head of a non-final chunk in synthetic mode: no loss (the chunk learns from the predicted gradient)."""

    loss_parts: dict[str, tuple[str, float]] = {}
    metric_counts: dict[str, str] = {}

    def forward(self, hidden, mask, batch, carry):
        return {}, {}, {}


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


class SyntheticStageMixin:
    """Synthetic-gradient behaviour on top of ``Stage`` (its optimizer, clipping, RNG and checkpoint files):
    ``runtime.SyntheticStage`` combines the two (this module cannot import ``runtime``, which imports it)."""

    def __init__(self, model, k: int, cfg, device: torch.device):
        super().__init__(model, k, cfg, device, frozen=False)
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
        self.pending: collections.deque[Pending] = collections.deque()
        #: true gradients of this chunk's input (micro-batch order), for chunk k-1
        self.outbox: collections.deque[torch.Tensor] = collections.deque()
        self.use_true = False  # warm-up: wait for the true gradient and use it alone
        self.seen = 0
        #: running RMS of δ·c (``target_scale: rms``): M_k's targets are δ·c / target_rms, O(1) per element
        self.target_rms: torch.Tensor | None = None

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

        from ..checkpoint import CheckpointError

        try:
            self.module.load_state_dict(load_file(str(directory / SYNTHETIC_FILE)))
            state = torch.load(directory / "synthetic_state.pt", weights_only=False)
            self.sg_optimizer.load_state_dict(state["optimizer"])
            self.target_rms = state["target_rms"]
        except Exception as e:  # noqa: BLE001 - name the unusable files
            raise CheckpointError(f"cannot load chunk {self.k}'s synthetic-gradient module from {directory}: "
                                  f"{type(e).__name__}: {e}") from e


__all__ = ["SyntheticGradient", "NoHead", "token_cosine", "center_on_targets", "SyntheticStageMixin", "SYNTHETIC_FILE",
           "SYNTHETIC_EXPORT_FILE"]
