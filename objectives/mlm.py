"""Masked language modelling as in BERT (Devlin et al., 2019, §3.1 and appendix A.1).

Selection: each non-special token independently with probability ``mask_ratio`` (the HF-compatible default), or
exactly ``round(mask_ratio * n)`` tokens per block (``static_count``: fixed shapes for compiled fast paths), or whole
words (``whole_word``). Of the selected tokens, ``mask_token_prob`` become [MASK], ``random_token_prob`` a random
non-special token, the rest stay unchanged. The prediction head is sparse: hidden states are gathered at the
selected positions before the vocabulary projection, so no [B, L, V] tensor is ever built.

The model is the stock ``*ForMaskedLM`` of ``model.arch`` (``objectives.backbones``: BERT, RoBERTa, ModernBERT);
every part of it is reached through its backbone.

Split protocol (``objectives.base``): the stem is the backbone's embeddings, the cut layers its layer list (run by its
:class:`~objectives.backbones.LayerRunner`), the final head its final norm and MLM head; a non-final chunk gets
:class:`LocalMLMHead`. With K > 1 the decoder is untied from the word embeddings (chunk 0 owns them) and starts as a
copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .backbones import backbone_of
from .base import IGNORE_INDEX, Objective, bert_init_, build_options, encoder_attention_mask


@dataclass
class MLMConfig:
    mask_ratio: float = 0.15
    """Fraction of non-special tokens selected for prediction."""
    mask_token_prob: float = 0.8
    """Of the selected tokens, fraction replaced by [MASK]."""
    random_token_prob: float = 0.1
    """Of the selected tokens, fraction replaced by a uniformly drawn non-special token (the rest are kept)."""
    whole_word: bool = False
    """Select whole words (all their WordPiece pieces) instead of single tokens."""
    static_count: bool = False
    """Select exactly round(mask_ratio * n) tokens per block instead of independent Bernoulli draws."""

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mlm.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                "objective.mlm.mask_token_prob and random_token_prob must be >= 0 and sum to at most 1, got "
                f"{self.mask_token_prob} + {self.random_token_prob}"
            )


def select_tokens(
    candidates: torch.Tensor, word_ids: torch.Tensor, cfg: MLMConfig, gen: torch.Generator
) -> torch.Tensor:
    """Boolean [L] selection over ``candidates`` ([L] bool) following ``cfg``; word_ids [L] (-1 for specials)."""
    n = int(candidates.sum())
    if n == 0:
        return torch.zeros_like(candidates)
    if not cfg.whole_word:
        if cfg.static_count:
            k = round(cfg.mask_ratio * n)
            positions = torch.nonzero(candidates).squeeze(1)
            chosen = positions[torch.randperm(n, generator=gen)[:k]]
            selected = torch.zeros_like(candidates)
            selected[chosen] = True
            return selected
        return candidates & (torch.rand(candidates.shape, generator=gen) < cfg.mask_ratio)
    # whole words: word ids of candidate tokens; tokens without a word id count as their own word
    words = torch.where(word_ids >= 0, word_ids, -(torch.arange(len(word_ids)) + 1))
    unique_words, token_word = torch.unique(words[candidates], return_inverse=True)
    if not cfg.static_count:
        picked = torch.rand(len(unique_words), generator=gen) < cfg.mask_ratio
        selected = torch.zeros_like(candidates)
        selected[candidates] = picked[token_word]
        return selected
    # static count with whole words: add words in random order while they fit the budget
    budget = round(cfg.mask_ratio * n)
    sizes = torch.bincount(token_word, minlength=len(unique_words))
    picked = torch.zeros(len(unique_words), dtype=torch.bool)
    total = 0
    for w in torch.randperm(len(unique_words), generator=gen).tolist():
        if total + int(sizes[w]) <= budget:
            picked[w] = True
            total += int(sizes[w])
            if total == budget:
                break
    selected = torch.zeros_like(candidates)
    selected[candidates] = picked[token_word]
    return selected


# --------------------------------------------------------------------------- decoupled pieces (split protocol)


class BertStem(nn.Module):
    """Chunk 0's input: token ids [B, L] -> embeddings [B, L, H] (the encoder's first step: ``BertEmbeddings`` or
    the arch's); no loss, no carry."""

    loss_parts: dict[str, tuple[str, float]] = {}
    metric_counts: dict[str, str] = {}

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, batch):
        return self.embeddings(input_ids=batch["input_ids"]), {}, {}, {}, {}


class LocalMLMHead(nn.Module):
    """Auxiliary MLM head of a non-final chunk, in the arch's style (``Backbone.extra_layer``/``aux_transform``):
    ``[a transformer layer] → transform (BERT: dense → GeLU → LayerNorm) → own decoder`` on the masked positions only
    (sparse, [M, V] logits, gathered by ``objective.gather_index``). Never tied to the input embeddings: a tied
    matrix would carry gradients across chunks."""

    loss_parts = {"mlm_loss": ("n_masked", 1.0)}
    metric_counts = {"mlm_loss": "n_masked", "mlm_acc": "n_masked"}
    fused = False  #: run the extra layer through FusedEncoder (the fast path)

    def __init__(self, config, extra_layer: bool, objective: Objective):
        super().__init__()
        backbone = backbone_of(config)
        self.gather_index = objective.gather_index  # a bound method: plain attribute, not a submodule
        self.run_layer = backbone.runner_class.run  # runs the extra layer with the chunk's layer context
        self.layer = backbone.extra_layer(config) if extra_layer else None
        self.transform = backbone.aux_transform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        bert_init_(self, config.initializer_range)

    def forward(self, hidden, context, batch, carry):
        if self.layer is not None:
            hidden = self.run_layer(self.layer, hidden, context, self.fused)
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        logits = self.decoder(self.transform(hidden.flatten(0, 1)[index]))
        loss_sum, correct = Objective.masked_lm_sums(logits, Objective.gather_targets(batch["labels"], index, valid))
        n = selected.sum()
        return {"mlm_loss": loss_sum}, {"n_masked": n}, {"mlm_acc": correct / n.clamp(min=1)}


class FinalMLMHead(nn.Module):
    """The model's own final norm and MLM head (``Backbone.final_norm``/``head``, e.g. ``BertForMaskedLM.cls``) on
    the last chunk, with the objective's loss parts and metrics: hidden [B, L, H] gathered at the M labelled
    positions -> [M, V] logits."""

    def __init__(self, final_norm: nn.Module, cls: nn.Module, objective: Objective):
        super().__init__()
        self.final_norm = final_norm
        self.cls = cls
        self.loss_parts = dict(objective.loss_parts)
        self.metric_counts = dict(objective.metric_counts)
        self.gather_index = objective.gather_index

    def forward(self, hidden, context, batch, carry):
        return self.mlm_parts(self.final_norm(hidden), batch)

    def mlm_parts(self, hidden, batch):
        """(sums, counts, metrics) of the MLM head on the encoder's final states [B, L, H]."""
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        mlm_sum, mlm_correct = Objective.masked_lm_sums(self.cls(hidden.flatten(0, 1)[index]),
                                                        Objective.gather_targets(batch["labels"], index, valid))
        counts = {"n_masked": selected.sum()}
        return {"mlm_loss": mlm_sum}, counts, {"mlm_acc": mlm_correct / counts["n_masked"].clamp(min=1)}


# --------------------------------------------------------------------------- objective


class MLMObjective(Objective):
    """BERT masked language modelling with a sparse prediction head (model: the arch's ``*ForMaskedLM``)."""

    name = "mlm"
    loss_parts = {"mlm_loss": ("n_masked", 1.0)}
    metric_counts = {"mlm_loss": "n_masked", "mlm_acc": "n_masked"}

    def __init__(self, tokenizer, seed: int = 0, **options: Any):
        super().__init__(tokenizer, seed)
        self.config = build_options(MLMConfig, options, "objective.mlm")

    # ---------------------------------------------------------------- masking (CPU, DataLoader workers)
    def replace(
        self, ids: torch.Tensor, selected: torch.Tensor, gen: torch.Generator, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the [MASK] / random / keep replacement to ``selected`` positions of ``ids`` ([L]).

        With ``groups`` ([L] long, one id per span), the decision is drawn once per group (SpanBERT)."""
        out = ids.clone()
        positions = torch.nonzero(selected).squeeze(1)
        if len(positions) == 0:
            return out
        if groups is None:
            u = torch.rand(len(positions), generator=gen)
        else:
            g = groups[positions]
            uniq, inverse = torch.unique(g, return_inverse=True)
            u = torch.rand(len(uniq), generator=gen)[inverse]
        cfg = self.config
        to_mask = u < cfg.mask_token_prob
        to_random = (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
        out[positions[to_mask]] = self.mask_id
        n_random = int(to_random.sum())
        if n_random:
            out[positions[to_random]] = self.random_tokens(n_random, gen)
        return out

    def mask_example(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        words = self._word_ids(example, len(ids))
        gen = self._generator(example)
        selected = select_tokens(self.candidate_mask(ids), words, self.config, gen)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        return {"input_ids": self.replace(ids, selected, gen), "labels": labels}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """examples: dicts with ``input_ids`` [L], optional ``word_ids`` [L] and ``index``; returns
        ``input_ids``/``labels``/``attention_mask`` [B, L] (labels: original id where predicted, -100 elsewhere)."""
        return self.pad_and_stack([self.mask_example(e) for e in examples])

    # ---------------------------------------------------------------- loss
    def counts(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"n_masked": (batch["labels"] != IGNORE_INDEX).sum()}

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor], normalizers=None) -> dict:
        """model: the arch's ``*ForMaskedLM``. Hidden states [B, L, H] are gathered at the M labelled positions
        before the prediction head, giving [M, V] logits (M fixed by the block shape under ``static_shapes``)."""
        backbone = backbone_of(model)
        mask = encoder_attention_mask(batch)
        hidden = backbone.encoder(model)(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        logits = backbone.head(model)(hidden.flatten(0, 1)[index])
        loss_sum, correct = self.masked_lm_sums(logits, self.gather_targets(batch["labels"], index, valid))
        counts = {"n_masked": selected.sum()}
        return self.reduce(
            {"mlm_loss": loss_sum}, counts, normalizers, {"mlm_acc": correct / counts["n_masked"].clamp(min=1)}
        )

    def max_selected(self, block_len: int) -> int | None:
        """round(mask_ratio * L) with ``static_count`` (at most that many of the block's n <= L candidates; whole
        words never overshoot the budget); None for Bernoulli selection."""
        return round(self.config.mask_ratio * block_len) if self.config.static_count else None

    # ---------------------------------------------------------------- model / export
    def build_model(self, model_config) -> nn.Module:
        """The stock ``*ForMaskedLM`` of ``model_config.arch`` (``objectives.backbones.BACKBONES``)."""
        from .backbones import BACKBONES

        ids = {"pad": self.pad_id, "cls": self.cls_id, "sep": self.sep_id}
        return BACKBONES[model_config.arch].masked_lm(model_config, self.vocab_size, ids)

    def export(self, model: nn.Module, out_dir, tokenizer) -> None:
        from pretrain.hf_io import save_hf

        save_hf(model, out_dir, tokenizer)

    # ---------------------------------------------------------------- split protocol (``objectives.base``)
    synthetic_count_key = "n_masked"

    def encoders(self, model: nn.Module) -> list[nn.Module]:
        return backbone_of(model).fused_stacks(model)

    def split_config(self, model: nn.Module):
        return model.config

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return backbone_of(model).layers(model)

    def layer_runner(self, model: nn.Module):
        return backbone_of(model).runner(model)

    def stem(self, model: nn.Module) -> nn.Module:
        return BertStem(backbone_of(model).embeddings(model))

    def final_head(self, model: nn.Module) -> nn.Module:
        backbone = backbone_of(model)
        return FinalMLMHead(backbone.final_norm(model), backbone.head(model), self)

    def aux_head(self, config, extra_layer: bool) -> nn.Module:
        return LocalMLMHead(config, extra_layer, self)

    def input_embeddings(self, model: nn.Module) -> torch.Tensor:
        return backbone_of(model).word_embeddings(model).weight

    def prepare_split(self, model: nn.Module, chunks: int) -> None:
        """K > 1: untie the decoder (``Backbone.untie``); chunk 0 owns the word embeddings."""
        if chunks > 1:
            backbone_of(model).untie(model)

    def export_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy ready for export (``Backbone.export_copy``: an untied decoder gets its own bias tensor)."""
        return backbone_of(model).export_copy(model)
