"""Cutting an encoder into K chunks trained by local losses (DESIGN.md §4, ``decouple.mode: local``).

The encoder the objective names (``Objective.split_config``/``layers``: embeddings + L transformer layers) is cut
into K contiguous chunks; every chunk runs its layers with the objective's ``layer_runner`` (the model's backbone,
``objectives.backbones``), whose per-batch context is built from absolute positions 0..L-1 and each layer's own
attention type, so a layer computes in its chunk what it computes in the whole model (RoPE, local/global attention). Chunk k owns its layers (chunk 0 also the objective's ``stem``) and a head:

* chunks 0..K-2: an **auxiliary head** with its own parameters (``Objective.aux_head``), never tied to anything
  another chunk owns: a shared tensor would carry gradients across chunks.
* chunk K-1: the objective's real head (``Objective.final_head``), after ``Objective.prepare_split`` untied whatever
  it shares with chunk 0.

A chunk detaches its input, so no gradient ever crosses a boundary; every chunk's loss is normalised token-exactly
(sum / the window's count) like the trainer's, with ``Objective.reduce``. Besides the hidden states, the tensors of
``Objective.carry`` (e.g. ELECTRA's sampled "replaced" labels) cross every boundary. This module knows no objective
by name (``tests/test_split.py`` checks it).

:class:`ChunkedModel` builds the chunks as *views* of one full model (plus the auxiliary heads), so the K=1 case is
the ordinary model and stitching chunks back for export is just loading every chunk's tensors into it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from objectives.base import Objective

from .modes import stage_class, unsupported
from .ranges import layer_ranges

#: checkpoint/export keys of the auxiliary heads start with this prefix (followed by the chunk index)
AUX_PREFIX = "aux."


# --------------------------------------------------------------------------- chunks


class Chunk(nn.Module):
    """Chunk ``index`` of ``num_chunks``: [stem] + layers + head.

    ``forward(batch, inputs, normalizers)`` takes the lower chunk's output ``inputs`` ({"hidden": [B, L, H], plus
    carried tensors}; None for chunk 0), **detaches it**, and returns ``(outputs, out)``: the dict to send to the next
    chunk (hidden states in fp32) and the loss dict (``loss`` for backward, detached metrics under the names of
    ``metric_counts``). ``with_head=False`` skips the head (frozen chunks of the control run): ``out`` is empty.
    ``boundary_grads=True`` (synthetic gradients) keeps both ends differentiable: ``inputs["hidden"]`` is used as
    given (the caller passes a leaf and reads its ``.grad``) and the returned hidden states keep their graph.
    ``fused`` (the fast path, :func:`pretrain.fast.apply_fast_path_to_chunks`): layers run through FusedEncoder
    (where the arch does not fuse query/key/value itself). ``runner``: the objective's ``layer_runner``.
    ``objective`` gives the loss reduction (``Objective.reduce`` over the stem's and head's ``loss_parts``)."""

    fused = False

    def __init__(self, index: int, num_chunks: int, config, runner, stem: nn.Module | None, layers: list[nn.Module],
                 head: nn.Module, layer_range: tuple[int, int], objective: Objective):
        super().__init__()
        self.index, self.num_chunks, self.layer_range = index, num_chunks, layer_range
        self.config = config
        self.runner = runner  # a plain object (no parameters)
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.reduce = objective.reduce  # a bound method: plain attribute, not a submodule
        self.is_final = index == num_chunks - 1
        prefix = f"chunk{index}_"
        counts = dict(stem.metric_counts) if stem is not None else {}
        counts.update({prefix + m: c for m, c in head.metric_counts.items()})
        if self.is_final:
            counts.update(head.metric_counts)
        #: logged metric -> count key (for :class:`~pretrain.metrics.MetricTracker`)
        self.metric_counts = counts

    def attention_mask(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        """The layers' context for ``batch`` (``LayerRunner.context``): the attention mask of BERT-shaped layers;
        ModernBERT's masks and RoPE tables per attention type."""
        return self.runner.context(hidden, batch)

    def forward(self, batch: Mapping[str, torch.Tensor], inputs: dict[str, torch.Tensor] | None, normalizers=None,
                with_head: bool = True, boundary_grads: bool = False):
        if self.stem is not None:
            hidden, carry, sums, counts, metrics = self.stem(batch)
            parts = self.stem.loss_parts
        else:
            if inputs is None:
                raise ValueError(f"chunk {self.index} needs the output of chunk {self.index - 1}")
            # the boundary: no gradient flows to the lower chunk (synthetic mode: only through the caller's leaf)
            hidden = inputs["hidden"] if boundary_grads else inputs["hidden"].detach()
            carry = {k: v for k, v in inputs.items() if k != "hidden"}
            sums, counts, metrics, parts = {}, {}, {}, {}
        mask = self.attention_mask(hidden, batch)
        for layer in self.layers:
            hidden = self.runner.run(layer, hidden, mask, self.fused)
        if not with_head:  # the frozen-random control: features only
            return {"hidden": hidden.detach().float(), **carry}, {}
        head_sums, head_counts, head_metrics = self.head(hidden, mask, batch, carry)
        out = self.reduce({**sums, **head_sums}, {**counts, **head_counts}, normalizers,
                          {**metrics, **head_metrics}, parts={**parts, **self.head.loss_parts})
        prefix = f"chunk{self.index}_"
        for name in self.head.metric_counts:
            out[prefix + name] = out[name] if self.is_final else out.pop(name)
        return {"hidden": hidden.float() if boundary_grads else hidden.detach().float(), **carry}, out


class NoHead(nn.Module):
    """Head of a non-final chunk whose mode adds no auxiliary loss (synthetic: the chunk learns from the predicted
    gradient of its output)."""

    loss_parts: dict[str, tuple[str, float]] = {}
    metric_counts: dict[str, str] = {}

    def forward(self, hidden, mask, batch, carry):
        return {}, {}, {}


class ChunkedModel(nn.Module):
    """The objective's full model cut into chunks, plus the auxiliary heads.

    Attributes: ``model`` (the stock model, after ``objective.prepare_split``), ``objective`` (its own heads, e.g.
    SBO), ``aux`` (``ModuleList`` of the K-1 auxiliary heads; empty in synthetic mode), ``synthetic`` (the K-1
    synthetic-gradient modules M_k of mode synthetic, else empty; not part of any chunk's parameters) and ``chunks``
    (K :class:`Chunk` views sharing those modules).
    Tensor names of ``state_dict()`` (``model.…``, ``objective.…``, ``aux.k.…``) name each chunk's share in
    checkpoints (:meth:`chunk_state_dict`)."""

    def __init__(self, model: nn.Module, objective: Objective, decouple_cfg):
        super().__init__()
        problem = unsupported(type(objective), decouple_cfg.mode)
        if problem:
            raise NotImplementedError(problem)
        stage = stage_class(decouple_cfg.mode)  # what the mode adds to the chunks (auxiliary heads, boundary modules)
        self.aux_head = decouple_cfg.aux_head
        k_total = decouple_cfg.chunks
        objective.prepare_split(model, k_total)
        layers, config, runner = objective.layers(model), objective.split_config(model), objective.layer_runner(model)
        self.ranges = layer_ranges(len(layers), k_total, decouple_cfg.boundaries)
        self.model = model
        self.objective = objective
        self.aux = nn.ModuleList(stage.aux_heads(objective, model, config, decouple_cfg))
        self.synthetic = nn.ModuleList(stage.boundary_modules(objective, model, config, decouple_cfg))
        stem, final = objective.stem(model), objective.final_head(model)
        chunks = []
        for k, (start, stop) in enumerate(self.ranges):
            head = final if k == k_total - 1 else (self.aux[k] if len(self.aux) else NoHead())
            chunks.append(Chunk(k, k_total, config, runner, stem if k == 0 else None, layers[start:stop], head, (start, stop),
                                objective))
        # a plain list: the chunks are views of the modules above, not separately registered parameters
        self.chunks: list[Chunk] = chunks

    def train(self, mode: bool = True) -> "ChunkedModel":
        """Also the chunks' own modules (e.g. head wrappers such as ELECTRA's final head), which the plain list
        hides from ``nn.Module.train``."""
        super().train(mode)
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunk_parameters(self, k: int) -> list[nn.Parameter]:
        """Chunk k's trainable parameters, in the order of ``ChunkedModel.parameters()`` (deduplicated)."""
        owned = {id(p) for p in self.chunks[k].parameters()}
        return [p for p in self.parameters() if id(p) in owned]

    def chunk_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Chunk k's tensors under their ``ChunkedModel`` names; a tensor shared by two names appears once."""
        owned = {id(t) for t in self.chunks[k].state_dict(keep_vars=True).values()}
        out, seen = {}, set()
        for key, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in owned and id(tensor) not in seen:
                seen.add(id(tensor))
                out[key] = tensor.detach()
        return out

    def load_chunk_state_dict(self, k: int, tensors: Mapping[str, torch.Tensor]) -> None:
        expected = self.chunk_state_dict(k)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"chunk {k} checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected[key].copy_(tensor)

    def aux_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{AUX_PREFIX}{k}": v for k, v in self.aux.state_dict().items()}

    def export_model(self) -> nn.Module:
        """A copy of the stitched stock model, ready for ``objective.export`` (``Objective.export_copy``)."""
        return self.objective.export_copy(self.model)


__all__ = ["Chunk", "ChunkedModel", "layer_ranges", "AUX_PREFIX"]
