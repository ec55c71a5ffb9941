"""Cutting an encoder into K chunks trained by local losses (DESIGN.md §4, ``decouple.mode: local``).

The encoder of the objective's model (embeddings + L transformer layers) is cut into K contiguous chunks. Chunk k
owns its layers (chunk 0 also the embeddings) and a head:

* chunks 0..K-2: an **auxiliary head** with its own parameters: ``[1 BertLayer] → dense → GeLU → LayerNorm → own
  vocabulary projection`` (MLM, SpanBERT) or ``[1 layer] → dense → GeLU → dense → 1`` (ELECTRA's discriminator).
  Never tied to the input embeddings: a tied matrix would carry gradients across chunks.
* chunk K-1: the objective's real head (MLM decoder; SpanBERT's MLM decoder + SBO head; ELECTRA's discriminator
  head). With K > 1 its vocabulary projection is untied from the word embeddings (which chunk 0 owns) and starts as
  a copy of them; the SBO head then reads that untied matrix instead of the input embeddings.

A chunk detaches its input, so no gradient ever crosses a boundary; every chunk's loss is normalised token-exactly
(sum / the window's count) like the trainer's. ELECTRA: the generator runs inside chunk 0 (it shares the
embeddings, which chunk 0 owns); the discriminator is the decoupled encoder. Chunk 0 therefore also sends the
"replaced" labels it sampled ([B, L] uint8) along with the activations: no other chunk could compute them.

:class:`ChunkedModel` builds the chunks as *views* of one full model (plus the auxiliary heads), so the K=1 case is
the ordinary model and stitching chunks back for export is just loading every chunk's tensors into it.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn
import torch.nn.functional as F

from objectives.base import IGNORE_INDEX, Objective, bert_init_, encoder_attention_mask
from objectives.electra import replaced_token_sums

from ..fast import FusedEncoder

#: checkpoint/export keys of the auxiliary heads start with this prefix (followed by the chunk index)
AUX_PREFIX = "aux."


def layer_ranges(num_layers: int, chunks: int, boundaries: str | list[int] = "auto") -> list[tuple[int, int]]:
    """[start, stop) layer indices of each chunk. ``auto`` balances the layer count; the remainder goes to the
    upper chunks (chunk 0 also runs the embeddings). An explicit list gives the first layer of chunks 1..K-1."""
    if not 1 <= chunks <= num_layers:
        raise ValueError(f"decouple.chunks must be between 1 and the number of layers ({num_layers}), got {chunks}")
    if boundaries == "auto":
        sizes = [num_layers // chunks + (1 if k >= chunks - num_layers % chunks else 0) for k in range(chunks)]
        starts = [sum(sizes[:k]) for k in range(chunks)]
    else:
        starts = [0, *boundaries]
        if len(starts) != chunks or starts != sorted(set(starts)) or starts[-1] >= num_layers:
            raise ValueError(f"decouple.boundaries {boundaries} must be {chunks - 1} strictly increasing layer "
                             f"indices in [1, {num_layers - 1}]")
    stops = starts[1:] + [num_layers]
    return list(zip(starts, stops))


def reduce_parts(parts: dict[str, tuple[torch.Tensor, str, float]], counts: dict[str, torch.Tensor],
                 normalizers: Mapping[str, torch.Tensor] | None, metrics: dict[str, torch.Tensor]) -> dict:
    """``Objective.reduce`` for an explicit set of parts: part -> (loss sum, count key, weight).

    ``loss`` = sum_p weight_p * sum_p / normaliser[count key] (the window's count: token-exact); the logged part means
    use this batch's own counts. Same arithmetic order as ``Objective.reduce`` (bit-identical for K=1)."""
    norm = counts if normalizers is None else normalizers
    loss = None
    out: dict[str, torch.Tensor] = {}
    for name, (total, key, weight) in parts.items():
        term = weight * total / norm[key].clamp(min=1).to(total.device)
        loss = term if loss is None else loss + term
        out[name] = (total / counts[key].clamp(min=1).to(total.device)).detach()
    out["loss"] = loss
    out.update(counts)
    out.update({k: v.detach() for k, v in metrics.items()})
    return out


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask, fused: bool) -> torch.Tensor:
    """One HF ``BertLayer``/``ElectraLayer`` on hidden [B, L, H]; ``fused`` (the fast path): through
    :meth:`pretrain.fast.FusedEncoder.layer_forward` (one query/key/value GEMM, the same parameters)."""
    return FusedEncoder.layer_forward(layer, hidden, mask) if fused else layer(hidden, mask)


# --------------------------------------------------------------------------- heads
# A head maps (hidden [B, L, H], attention mask, batch, carry) to (parts, counts, metrics) as in ``reduce_parts``.
# Heads gather predicted positions with the objective's ``gather_index`` (static shapes on the fast path).


class LocalMLMHead(nn.Module):
    """Auxiliary MLM head of a non-final chunk: ``[BertLayer] → dense → GeLU → LayerNorm → own decoder`` on the
    masked positions only (sparse, [M, V] logits, gathered by ``objective.gather_index``)."""

    metric_counts = {"mlm_loss": "n_masked", "mlm_acc": "n_masked"}
    fused = False  #: run the extra layer through FusedEncoder (the fast path)

    def __init__(self, config, extra_layer: bool, objective: Objective):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer, BertPredictionHeadTransform

        self.gather_index = objective.gather_index  # a bound method: plain attribute, not a submodule
        self.layer = BertLayer(config) if extra_layer else None
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        bert_init_(self, config.initializer_range)

    def forward(self, hidden, mask, batch, carry):
        if self.layer is not None:
            hidden = run_layer(self.layer, hidden, mask, self.fused)
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        logits = self.decoder(self.transform(hidden.flatten(0, 1)[index]))
        loss_sum, correct = Objective.masked_lm_sums(logits, Objective.gather_targets(batch["labels"], index, valid))
        n = selected.sum()
        return {"mlm_loss": (loss_sum, "n_masked", 1.0)}, {"n_masked": n}, {"mlm_acc": correct / n.clamp(min=1)}


class FinalMLMHead(nn.Module):
    """The objective's own MLM head (``BertForMaskedLM.cls``) on the last chunk; SpanBERT adds the SBO head, whose
    vocabulary matrix is the decoder's (= the word embeddings when K = 1, where they are tied)."""

    def __init__(self, cls: nn.Module, objective: Objective):
        super().__init__()
        self.cls = cls
        self.sbo_head = getattr(objective, "sbo_head", None)
        self.loss_parts = dict(objective.loss_parts)
        self.metric_counts = dict(objective.metric_counts)
        self.gather_index = objective.gather_index
        self._sbo_inputs = getattr(objective, "sbo_inputs", None)

    def forward(self, hidden, mask, batch, carry):
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        mlm_sum, mlm_correct = Objective.masked_lm_sums(self.cls(hidden.flatten(0, 1)[index]),
                                                        Objective.gather_targets(batch["labels"], index, valid))
        counts = {"n_masked": selected.sum()}
        parts = {"mlm_loss": (mlm_sum, "n_masked", self.loss_parts["mlm_loss"][1])}
        metrics = {"mlm_acc": mlm_correct / counts["n_masked"].clamp(min=1)}
        if self.sbo_head is not None:
            left, right, positions, targets = self._sbo_inputs(hidden, batch)
            logits = self.sbo_head(left, right, positions, self.cls.predictions.decoder.weight)
            sbo_sum, sbo_correct = Objective.masked_lm_sums(logits, targets)
            counts["n_sbo"] = (batch["sbo_pos"] >= 0).sum()
            parts["sbo_loss"] = (sbo_sum, "n_sbo", self.loss_parts["sbo_loss"][1])
            metrics["sbo_acc"] = sbo_correct / counts["n_sbo"].clamp(min=1)
        return parts, counts, metrics


def _replaced_token_parts(logits: torch.Tensor, replaced: torch.Tensor, attention_mask: torch.Tensor,
                          weight: float, all_metrics: bool):
    """ELECTRA's discriminator loss (:func:`objectives.electra.replaced_token_sums`) as a head's (parts, counts,
    metrics); ``all_metrics`` False keeps only n_tokens and disc_acc (the auxiliary heads)."""
    total, counts, metrics = replaced_token_sums(logits, replaced, attention_mask)
    if not all_metrics:
        counts, metrics = {"n_tokens": counts["n_tokens"]}, {"disc_acc": metrics["disc_acc"]}
    return {"disc_loss": (total, "n_tokens", weight)}, counts, metrics


class LocalRTDHead(nn.Module):
    """Auxiliary replaced-token-detection head of a non-final ELECTRA discriminator chunk:
    ``[ElectraLayer] → dense → GeLU → dense → 1 logit per token``, weighted by ``disc_weight``."""

    metric_counts = {"disc_loss": "n_tokens", "disc_acc": "n_tokens"}
    fused = False  #: run the extra layer through FusedEncoder (the fast path)

    def __init__(self, config, extra_layer: bool, disc_weight: float):
        super().__init__()
        from transformers.models.electra.modeling_electra import ElectraLayer

        self.layer = ElectraLayer(config) if extra_layer else None
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)
        self.disc_weight = disc_weight
        bert_init_(self, config.initializer_range)

    def forward(self, hidden, mask, batch, carry):
        if self.layer is not None:
            hidden = run_layer(self.layer, hidden, mask, self.fused)
        logits = self.dense_prediction(F.gelu(self.dense(hidden))).squeeze(-1)
        return _replaced_token_parts(logits, carry["replaced"], batch["attention_mask"], self.disc_weight, False)


class FinalRTDHead(nn.Module):
    """ELECTRA's discriminator head (``ElectraForPreTraining.discriminator_predictions``) on the last chunk."""

    metric_counts = {"disc_loss": "n_tokens", "disc_acc": "n_tokens", "disc_acc_replaced": "n_replaced",
                     "disc_acc_original": "n_original"}

    def __init__(self, predictions: nn.Module, disc_weight: float):
        super().__init__()
        self.predictions = predictions
        self.disc_weight = disc_weight

    def forward(self, hidden, mask, batch, carry):
        return _replaced_token_parts(self.predictions(hidden), carry["replaced"], batch["attention_mask"],
                                     self.disc_weight, True)


# --------------------------------------------------------------------------- stems (chunk 0's input computation)


class BertStem(nn.Module):
    """Token ids -> embeddings (BertModel's first step)."""

    metric_counts: dict[str, str] = {}

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, batch):
        return self.embeddings(input_ids=batch["input_ids"]), {}, {}, {}, {}


class ElectraStem(nn.Module):
    """ELECTRA's generator (sparse MLM head, Gumbel-max sampling, no gradient through the sample) followed by the
    discriminator's embeddings of the corrupted block. Carries ``replaced`` [B, L] to the upper chunks."""

    metric_counts = {"gen_loss": "n_masked", "gen_acc": "n_masked", "replaced_frac": "n_masked"}

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.generator = model.generator
        self.embeddings = model.discriminator.electra.embeddings
        self.project = getattr(model.discriminator.electra, "embeddings_project", None)
        self.generate = objective.generate  # a bound method: plain attribute, not a submodule
        self.gen_weight = objective.loss_parts["gen_loss"][1]

    def forward(self, batch):
        attention_mask = batch["attention_mask"]
        gen = self.generate(self.generator, batch)
        gen_sum, gen_correct, selected, replaced = gen["gen_sum"], gen["gen_correct"], gen["selected"], gen["replaced"]
        embedded = self.embeddings(input_ids=gen["disc_input_ids"])
        if self.project is not None:
            embedded = self.project(embedded)
        n_masked = selected.sum()
        n_replaced_masked = (replaced & attention_mask.bool()).sum()
        metrics = {"gen_acc": gen_correct / n_masked.clamp(min=1),
                   "replaced_frac": n_replaced_masked / n_masked.clamp(min=1)}
        carry = {"replaced": replaced.to(torch.uint8)}
        return embedded, carry, {"gen_loss": (gen_sum, "n_masked", self.gen_weight)}, {"n_masked": n_masked}, metrics


# --------------------------------------------------------------------------- chunks


class Chunk(nn.Module):
    """Chunk ``index`` of ``num_chunks``: [stem] + layers + head.

    ``forward(batch, inputs, normalizers)`` takes the lower chunk's output ``inputs`` ({"hidden": [B, L, H], plus
    carried tensors}; None for chunk 0), **detaches it**, and returns ``(outputs, out)``: the dict to send to the next
    chunk (hidden states in fp32) and the loss dict (``loss`` for backward, detached metrics under the names of
    ``metric_counts``). ``with_head=False`` skips the head (frozen chunks of the control run): ``out`` is empty.
    ``boundary_grads=True`` (synthetic gradients) keeps both ends differentiable: ``inputs["hidden"]`` is used as
    given (the caller passes a leaf and reads its ``.grad``) and the returned hidden states keep their graph.
    ``fused`` (the fast path, :func:`pretrain.fast.apply_fast_path_to_chunks`): layers run through FusedEncoder."""

    fused = False

    def __init__(self, index: int, num_chunks: int, config, stem: nn.Module | None, layers: list[nn.Module],
                 head: nn.Module, layer_range: tuple[int, int]):
        super().__init__()
        self.index, self.num_chunks, self.layer_range = index, num_chunks, layer_range
        self.config = config
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.is_final = index == num_chunks - 1
        prefix = f"chunk{index}_"
        counts = dict(getattr(stem, "metric_counts", {}))
        counts.update({prefix + m: c for m, c in head.metric_counts.items()})
        if self.is_final:
            counts.update(head.metric_counts)
        #: logged metric -> count key (for :class:`~pretrain.metrics.MetricTracker`)
        self.metric_counts = counts

    def attention_mask(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        """The layers' attention mask for ``batch``: none on unpadded blocks (``encoder_attention_mask``: no host
        sync), else recomputed from its [B, L] mask exactly as ``BertModel`` does."""
        from transformers.masking_utils import create_bidirectional_mask

        # positional: the embeddings argument was renamed (input_embeds -> inputs_embeds) within transformers 5
        return create_bidirectional_mask(self.config, hidden, encoder_attention_mask(batch))

    def forward(self, batch: Mapping[str, torch.Tensor], inputs: dict[str, torch.Tensor] | None, normalizers=None,
                with_head: bool = True, boundary_grads: bool = False):
        if self.stem is not None:
            hidden, carry, parts, counts, metrics = self.stem(batch)
        else:
            if inputs is None:
                raise ValueError(f"chunk {self.index} needs the output of chunk {self.index - 1}")
            # the boundary: no gradient flows to the lower chunk (synthetic mode: only through the caller's leaf)
            hidden = inputs["hidden"] if boundary_grads else inputs["hidden"].detach()
            carry = {k: v for k, v in inputs.items() if k != "hidden"}
            parts, counts, metrics = {}, {}, {}
        mask = self.attention_mask(hidden, batch)
        for layer in self.layers:
            hidden = run_layer(layer, hidden, mask, self.fused)
        if not with_head:  # the frozen-random control: features only
            return {"hidden": hidden.detach().float(), **carry}, {}
        head_parts, head_counts, head_metrics = self.head(hidden, mask, batch, carry)
        out = reduce_parts({**parts, **head_parts}, {**counts, **head_counts}, normalizers,
                           {**metrics, **head_metrics})
        prefix = f"chunk{self.index}_"
        for name in self.head.metric_counts:
            out[prefix + name] = out[name] if self.is_final else out.pop(name)
        return {"hidden": hidden.float() if boundary_grads else hidden.detach().float(), **carry}, out


class ChunkedModel(nn.Module):
    """The objective's full model cut into chunks, plus the auxiliary heads.

    Attributes: ``model`` (the stock model, untied when K > 1), ``objective`` (its own heads, e.g. SBO), ``aux``
    (``ModuleList`` of the K-1 auxiliary heads; empty in synthetic mode), ``synthetic`` (the K-1 synthetic-gradient
    modules M_k of mode synthetic, else empty; not part of any chunk's parameters) and ``chunks`` (K :class:`Chunk`
    views sharing those modules).
    Tensor names of ``state_dict()`` (``model.…``, ``objective.…``, ``aux.k.…``) name each chunk's share in
    checkpoints (:meth:`chunk_state_dict`)."""

    def __init__(self, model: nn.Module, objective: Objective, decouple_cfg):
        super().__init__()
        name = objective.name
        if name not in ("mlm", "span", "electra"):
            raise NotImplementedError(f"decouple.mode=local does not know how to cut objective '{name}'")
        synthetic = decouple_cfg.mode == "synthetic"
        if synthetic and name == "electra":
            raise NotImplementedError("decouple.mode=synthetic supports the mlm and span objectives (its modules "
                                      "condition on masked-token labels); use decouple.mode=local for electra")
        self.objective_name = name
        self.aux_head = decouple_cfg.aux_head
        k_total = decouple_cfg.chunks
        if name == "electra":
            encoder_model = model.discriminator
            layers = list(encoder_model.electra.encoder.layer)
        else:
            encoder_model = model
            layers = list(model.bert.encoder.layer)
            if k_total > 1:
                untie_decoder(model)
        config = encoder_model.config
        self.ranges = layer_ranges(len(layers), k_total, decouple_cfg.boundaries)
        self.model = model
        self.objective = objective
        extra = decouple_cfg.aux_head == "layer"
        if name == "electra":
            disc_weight = objective.loss_parts["disc_loss"][1]
            self.aux = nn.ModuleList([LocalRTDHead(config, extra, disc_weight) for _ in range(k_total - 1)])
            stem = ElectraStem(model, objective)
            final = FinalRTDHead(model.discriminator.discriminator_predictions, disc_weight)
        elif synthetic:
            from .synthetic import NoHead, SyntheticGradient

            s = decouple_cfg.synthetic
            words = model.bert.embeddings.word_embeddings.weight.detach()
            self.aux = nn.ModuleList()
            self.synthetic = nn.ModuleList([SyntheticGradient(config, s.arch, s.context, words)
                                            for _ in range(k_total - 1)])
            stem = BertStem(model.bert.embeddings)
            final = FinalMLMHead(model.cls, objective)
        else:
            self.aux = nn.ModuleList([LocalMLMHead(config, extra, objective) for _ in range(k_total - 1)])
            stem = BertStem(model.bert.embeddings)
            final = FinalMLMHead(model.cls, objective)
        if not synthetic:
            self.synthetic = nn.ModuleList()
        chunks = []
        for k, (start, stop) in enumerate(self.ranges):
            head = final if k == k_total - 1 else (NoHead() if synthetic else self.aux[k])
            chunks.append(Chunk(k, k_total, config, stem if k == 0 else None, layers[start:stop], head, (start, stop)))
        # a plain list: the chunks are views of the modules above, not separately registered parameters
        self.chunks: list[Chunk] = chunks

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
        """A copy of the stitched stock model, ready for ``objective.export``. An untied MLM decoder also gets its
        own bias tensor: ``transformers`` ties ``decoder.bias`` to ``predictions.bias`` only with tied embeddings."""
        model = copy.deepcopy(self.model)
        if self.objective_name != "electra" and not model.config.tie_word_embeddings:
            decoder = model.cls.predictions.decoder
            decoder.bias = nn.Parameter(model.cls.predictions.bias.detach().clone())
        return model


def untie_decoder(model: nn.Module) -> None:
    """Give ``BertForMaskedLM``'s decoder its own matrix (a copy of the word embeddings, so the initial model is the
    same function) and mark the config untied, so exports reload untied."""
    decoder = model.cls.predictions.decoder
    embeddings = model.bert.embeddings.word_embeddings
    if decoder.weight is embeddings.weight:
        decoder.weight = nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False


__all__ = ["Chunk", "ChunkedModel", "LocalMLMHead", "LocalRTDHead", "layer_ranges", "untie_decoder", "AUX_PREFIX"]
