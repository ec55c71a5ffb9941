"""The Objective protocol shared by MLM, SpanBERT and ELECTRA.

An objective is a plain ``nn.Module`` that knows nothing about processes or devices:

* ``collate(examples) -> batch`` runs on the CPU in DataLoader workers and does all the masking. Each example may
  carry an ``"index"`` (its global position in the data stream); its masking is then drawn from a generator seeded
  by ``(seed, index)`` so a batch is identical whatever the number of workers or processes.
* ``build_model(model_config)`` creates the stock ``transformers`` model(s) that are trained and exported, and the
  objective's own heads (e.g. the SBO head) as attributes of the objective.
* ``forward(model, batch, normalizers=None) -> dict`` returns ``loss`` (for backward) plus detached per-part means
  and counts. Losses are sums divided by a normaliser: by default the batch's own count (a mean), or, from the
  trainer, the count summed over the whole accumulation window and all processes, so the gradient equals the one of
  the big batch (token-exact).
* ``counts(batch)`` gives those counts from the collated batch alone, without a forward pass.

The split protocol (``pretrain.fast`` and ``pretrain.decouple`` call it and know no objective by name):

* ``encoders(model) -> [nn.Module]``: the transformer stacks the fast path fuses (each has ``.encoder.layer``; none
  where the arch projects query/key/value with one GEMM already, as ModernBERT does).
* ``split_config(model)``: the HF config of the encoder that is cut into chunks; ``layers(model) -> [nn.Module]``: its
  L transformer layers, each hidden [B, L, H] -> [B, L, H]; ``layer_runner(model)``: how to run them
  (``objectives.backbones.LayerRunner``: ``context(hidden, batch)`` once per batch, e.g. the attention mask, then
  ``run(layer, hidden, context, fused)`` per layer).
* ``stem(model)``: chunk 0's input computation, ``forward(batch) -> (hidden [B, L, H], carry, sums, counts,
  metrics)``; ``carry`` holds the tensors of :attr:`carry` ([B, L] each), which cross every boundary with ``hidden``.
* ``final_head(model)`` (the last chunk) and ``aux_head(config, extra_layer)`` (a fresh head of a non-final chunk,
  optionally with one extra transformer layer): ``forward(hidden [B, L, H], context, batch, carry) -> (sums, counts,
  metrics)``, ``context`` being the layer runner's. Stems and heads declare ``loss_parts`` (part -> (count key, weight)) and ``metric_counts`` like an
  objective; a chunk combines their sums with ``reduce(..., parts=...)``.
* ``prepare_split(model, chunks)``: adapt the model before it is cut (e.g. untie what two chunks would share);
  ``export_copy(model)``: a copy of the stitched model ready for ``export``.
* Mode synthetic also needs ``input_embeddings(model)`` ([V, H], its label-conditioning table starts as a copy) and
  ``synthetic_count_key`` (the count whose window total scales the predicted gradients). A decoupling mode names the
  members it needs (its stage's ``requires``); an objective supports the modes whose members it provides.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, global sample index): the same sample always gets the same masking."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF]).generate_state(2)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return gen


def build_options(cls, options: Mapping[str, Any], where: str):
    """Instantiate the dataclass ``cls`` from ``options``; an unknown key names the closest valid one."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"unknown option '{key}' for {where}{hint}")
    return cls(**options)


def bert_init_(module: nn.Module, std: float) -> nn.Module:
    """BERT initialisation of a freshly built head: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:  # ModernBERT's LayerNorms have none
                nn.init.zeros_(m.bias)
    return module


def encoder_attention_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The mask to hand an encoder: None when the collator saw no padding (``padded`` False: every block full, as
    packed pretraining blocks are), so SDPA may run its flash kernel, also under ``torch.compile``; else the
    batch's ``attention_mask`` [B, L]."""
    return None if batch.get("padded") is False else batch.get("attention_mask")


def layer_attention_mask(config, hidden: torch.Tensor, batch: Mapping[str, Any]):
    """The mask a transformer layer takes for ``batch``: none on unpadded blocks (``encoder_attention_mask``: no
    host sync), else built from its [B, L] mask exactly as ``BertModel`` does. hidden: [B, L, H]."""
    from transformers.masking_utils import create_bidirectional_mask

    # positional: the embeddings argument was renamed (input_embeds -> inputs_embeds) within transformers 5
    return create_bidirectional_mask(config, hidden, encoder_attention_mask(batch))


class Objective(nn.Module):
    """Base class: tokenizer bookkeeping, padding/stacking and token-exact loss reduction."""

    name: str = "objective"
    #: the ``model.arch`` values (``objectives.backbones.BACKBONES``) this objective trains; None: every one
    archs: tuple[str, ...] | None = None
    #: part name -> (count key, weight); ``loss`` = sum_p weight_p * sum_p / normaliser[count key]
    loss_parts: dict[str, tuple[str, float]] = {}
    #: logged metric -> count key it is averaged over (the trainer weights means by these counts)
    metric_counts: dict[str, str] = {}

    def __init__(self, tokenizer, seed: int = 0):
        super().__init__()
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        if None in (self.pad_id, self.mask_id, self.cls_id, self.sep_id):
            raise ValueError("the tokenizer needs [PAD], [MASK], [CLS] and [SEP] tokens (a BERT-style WordPiece vocab)")
        self.seed = seed
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        special[list(tokenizer.all_special_ids)] = True
        self.register_buffer("special_token_mask", special, persistent=False)
        #: ids a "random token" replacement draws from (uniform over the non-special vocabulary)
        self.register_buffer("random_token_ids", torch.nonzero(~special).squeeze(1), persistent=False)
        self._fallback_gen = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- collation helpers
    def _generator(self, example: Mapping[str, Any]) -> torch.Generator:
        if "index" in example and example["index"] is not None:
            return sample_generator(self.seed, int(example["index"]))
        return self._fallback_gen

    @staticmethod
    def _word_ids(example: Mapping[str, Any], length: int) -> torch.Tensor:
        """Word index per token as a LongTensor, -1 for special tokens (``None`` in HF's ``word_ids()``)."""
        words = example.get("word_ids")
        if words is None:
            return torch.full((length,), -1, dtype=torch.long)
        if isinstance(words, torch.Tensor):
            return words.long()
        return torch.tensor([-1 if w is None else int(w) for w in words], dtype=torch.long)

    def candidate_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where a token may be selected for prediction: never [CLS]/[SEP]/[PAD]/[MASK]/[UNK]..."""
        return ~self.special_token_mask[ids]

    def random_tokens(self, n: int, gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(self.random_token_ids), (n,), generator=gen)
        return self.random_token_ids[pick]

    def pad_and_stack(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Right-pad per-example 1-D tensors to the longest example; adds ``attention_mask`` and ``padded`` (a
        Python bool: whether any row is shorter, so encoders may skip an all-ones mask without a host sync)."""
        lengths = [len(r["input_ids"]) for r in rows]
        length = max(lengths)
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "word_ids": -1}
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            if rows[0][key].dim() != 1 or len(rows[0][key]) != len(rows[0]["input_ids"]):
                continue
            out = torch.full((len(rows), length), fill.get(key, 0), dtype=rows[0][key].dtype)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = r[key]
            batch[key] = out
        batch["attention_mask"] = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
        batch["padded"] = min(lengths) < length
        return batch

    def clean_batch(self, rows: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Token ids [L_i] (with [CLS]/[SEP]) as a batch in this objective's layout that masks nothing: every token
        is itself (``original_ids`` = ``input_ids``) and no label is set, so a stem embeds the text as it is (the
        linear probes' features)."""
        return self.pad_and_stack([{"input_ids": r, "original_ids": r, "labels": torch.full_like(r, IGNORE_INDEX)}
                                   for r in rows])

    # ---------------------------------------------------------------- loss helpers
    #: fast path (``pretrain.fast``): gather predicted positions into a fixed number of rows, no host sync
    static_shapes: bool = False

    def max_selected(self, block_len: int) -> int | None:
        """An upper bound on the tokens selected for prediction in one block of ``block_len`` tokens, if the masking
        guarantees one (static counts); ``None`` for Bernoulli selection (the count is then unbounded)."""
        return None

    def gather_index(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices [M] into ``mask.flatten()`` of its True entries, in row-major order (the order of
        ``x[mask]``), and ``valid`` [M] bool. Dynamic: M = mask.sum() (a host sync), all valid. With
        ``static_shapes`` and a ``max_selected`` bound: M = B * bound, a constant for the block shape, computed with
        ``torch.nonzero_static`` (no sync); the trailing rows point at index 0 and are not valid."""
        flat = mask.flatten()
        bound = self.max_selected(mask.shape[-1]) if self.static_shapes else None
        if bound is None:
            index = torch.nonzero(flat).squeeze(1)
            return index, torch.ones_like(index, dtype=torch.bool)
        size = bound * (flat.numel() // mask.shape[-1])
        index = torch.nonzero_static(flat, size=size, fill_value=0).squeeze(1)
        return index, torch.arange(size, device=flat.device) < flat.sum()

    @staticmethod
    def gather_targets(labels: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """labels [B, L] at the flat ``index`` [M]; IGNORE_INDEX where not ``valid`` (ignored by the loss sums)."""
        return torch.where(valid, labels.flatten()[index], IGNORE_INDEX)

    def counts(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normaliser counts of this batch, from the collated tensors alone (no forward pass)."""
        raise NotImplementedError

    def window_counts(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``counts`` summed over an accumulation window, as float tensors on the micro-batches' device: the
        token-exact normalisers of this process's share of the step."""
        total: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            for key, value in self.counts(batch).items():
                total[key] = total.get(key, 0) + value.float()
        return total

    def reduce(
        self,
        sums: dict[str, torch.Tensor],
        counts: dict[str, torch.Tensor],
        normalizers: Mapping[str, torch.Tensor] | None,
        extra: dict[str, torch.Tensor] | None = None,
        parts: Mapping[str, tuple[str, float]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Combine per-part loss sums into ``loss`` and detached per-part means.

        sums: part -> summed loss over this batch; counts: count key -> count in this batch;
        normalizers: count key -> count over the accumulation window and all processes (default: ``counts``);
        parts: part -> (count key, weight), in the order the terms are added (default: ``loss_parts``; a decoupled
        chunk passes its own stem's and head's).
        """
        norm = counts if normalizers is None else normalizers
        loss = None
        out: dict[str, torch.Tensor] = {}
        for part, (key, weight) in (self.loss_parts if parts is None else parts).items():
            term = weight * sums[part] / norm[key].clamp(min=1).to(sums[part].device)
            loss = term if loss is None else loss + term
            out[part] = (sums[part] / counts[key].clamp(min=1).to(sums[part].device)).detach()
        out["loss"] = loss
        for key, value in counts.items():
            out[key] = value
        for key, value in (extra or {}).items():
            out[key] = value.detach()
        return out

    @staticmethod
    def masked_lm_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy (in fp32) and number of correct argmax predictions; logits [M, V], targets [M]
        (rows with target IGNORE_INDEX add nothing to either)."""
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        return loss, correct

    def set_unigram_counts(self, counts) -> None:
        """Corpus token counts [V] for objectives that draw replacement tokens from them; ignored by default."""

    # ---------------------------------------------------------------- model / export
    def build_model(self, model_config) -> nn.Module:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir, tokenizer) -> None:
        raise NotImplementedError

    def export_targets(self, model: nn.Module, out_dir) -> list[tuple[Any, str, nn.Module]]:
        """(export directory, ``transformers`` auto class, training module whose logits it must reproduce) for each
        model ``export`` writes; the trainer loads each in a fresh process and compares logits."""
        return [(out_dir, "AutoModelForMaskedLM", model)]

    # ---------------------------------------------------------------- split protocol (see the module docstring)
    #: tensors besides ``hidden`` that cross a chunk boundary: name -> dtype (each [B, L])
    carry: dict[str, torch.dtype] = {}
    #: count key whose window total scales synthetic-gradient targets (mode synthetic only)
    synthetic_count_key: str | None = None

    def encoders(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def split_config(self, model: nn.Module):
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def layer_runner(self, model: nn.Module):
        raise NotImplementedError

    def stem(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def final_head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def aux_head(self, config, extra_layer: bool) -> nn.Module:
        raise NotImplementedError

    def input_embeddings(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def prepare_split(self, model: nn.Module, chunks: int) -> None:
        """Adapt ``model`` in place before it is cut into ``chunks`` chunks; nothing by default."""

    def export_copy(self, model: nn.Module) -> nn.Module:
        """A copy of the stitched ``model`` for ``export``; a deep copy by default."""
        return copy.deepcopy(model)
