"""Encoder backbones (``model.arch``): one :class:`Backbone` per stock ``transformers`` architecture, in
:data:`BACKBONES`. An objective, the fast path, the decoupled chunks and the probes reach the encoder only through
it, so an architecture is one entry here, not edits across the tree.

What a backbone says about its stock ``*ForMaskedLM`` model:

* how to build it from our ``ModelConfig`` (:meth:`Backbone.hf_config`: hidden_size, num_layers, num_heads,
  intermediate_size, max_position_embeddings, dropouts and the tokenizer's special ids map onto the arch's config;
  arch-specific fields come from the section ``model.<arch>``, e.g. :class:`ModernBertOptions`);
* its parts: the base encoder, the embedding stem (ids -> hidden), the layer list, the final norm (identity where
  the layers end normalised, as BERT's post-LN layers do), the MLM head on gathered rows ([M, H] -> [M, V]), the
  decoder (vocabulary projection) and the word embeddings;
* how to run one layer given a per-batch context (:class:`LayerRunner`: the attention mask; ModernBERT's runner
  also holds the RoPE cos/sin of absolute positions 0..L-1 and the sliding-window mask per ``attention_type``, so a
  layer computes the same in any chunk);
* fresh modules in the arch's style for the auxiliary heads of decoupled chunks (:meth:`Backbone.aux_transform`,
  :meth:`Backbone.extra_layer`), and how to untie the decoder from the word embeddings.

Which arch a built model is comes from its HF ``config.model_type`` (:func:`backbone_of`), so code holding a model
needs no other state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .base import encoder_attention_mask, layer_attention_mask


@dataclass
class ModernBertOptions:
    """``model.modernbert``: the fields of ``ModernBertConfig`` our ``model`` section has no counterpart for."""

    global_attn_every_n_layers: int = 3
    """Every n-th layer (layer 0, n, 2n, ...) attends globally; the others attend within ``local_attention``."""
    local_attention: int = 128
    """Window of the local layers in tokens (a token sees local_attention // 2 on either side)."""
    global_rope_theta: float = 160_000.0
    """RoPE base of the global layers (ModernBERT: 160k)."""
    local_rope_theta: float = 10_000.0
    """RoPE base of the local layers (ModernBERT: 10k)."""
    norm_eps: float = 1e-5
    """Epsilon of the (bias-free) LayerNorms."""

    def __post_init__(self):
        if self.global_attn_every_n_layers < 1:
            raise ValueError(f"model.modernbert.global_attn_every_n_layers must be >= 1, got "
                             f"{self.global_attn_every_n_layers}")
        if self.local_attention < 2 or self.local_attention % 2:
            raise ValueError(f"model.modernbert.local_attention must be an even number >= 2 (the window, half on "
                             f"either side), got {self.local_attention}")
        for name in ("global_rope_theta", "local_rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.modernbert.{name} must be > 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------- layer runners


class LayerRunner:
    """Runs BERT-shaped layers (``BertLayer``, ``RobertaLayer``, ``ElectraLayer``): the context of a batch is the
    attention mask (None on unpadded blocks); ``fused`` (the fast path) runs one query/key/value GEMM
    (:class:`pretrain.fast.FusedEncoder`). A plain object, not a module: it owns no parameters."""

    def __init__(self, config):
        self.config = config

    def context(self, hidden: torch.Tensor, batch) -> object:
        """What every layer takes besides hidden [B, L, H] for ``batch``."""
        return layer_attention_mask(self.config, hidden, batch)

    @staticmethod
    def run(layer: nn.Module, hidden: torch.Tensor, context, fused: bool = False) -> torch.Tensor:
        """One layer on hidden [B, L, H] with the batch's ``context`` (a static method: heads hold it without
        the model)."""
        from pretrain.fast import run_layer

        return run_layer(layer, hidden, context, fused)


class ModernBertRunner(LayerRunner):
    """Runs ``ModernBertEncoderLayer``s as ``ModernBertModel.forward`` does: the context maps each attention type
    of the config ("full_attention", "sliding_attention") to (its mask, the RoPE (cos, sin) of positions 0..L-1 with
    that type's base); a layer takes the entry of its own ``attention_type``. ``fused`` is ignored: the layers
    already compute query/key/value with one GEMM (``Wqkv``)."""

    def __init__(self, config, rotary: nn.Module):
        super().__init__(config)
        self.rotary = rotary

    def context(self, hidden: torch.Tensor, batch) -> dict:
        from transformers.masking_utils import create_bidirectional_sliding_window_mask

        mask = encoder_attention_mask(batch)
        masks = {"full_attention": layer_attention_mask(self.config, hidden, batch),
                 "sliding_attention": create_bidirectional_sliding_window_mask(self.config, hidden, mask)}
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return {kind: (masks[kind], self.rotary(hidden, positions, kind)) for kind in set(self.config.layer_types)}

    @staticmethod
    def run(layer: nn.Module, hidden: torch.Tensor, context, fused: bool = False) -> torch.Tensor:
        mask, rope = context[layer.attention_type]
        return layer(hidden, attention_mask=mask, position_embeddings=rope)


# --------------------------------------------------------------------------- backbones


class Backbone:
    """Base class: BERT (``BertForMaskedLM``: ``.bert``, head ``.cls``). Subclasses override what differs."""

    name = "bert"
    #: options dataclass of the section ``model.<name>`` (None: no arch-specific fields)
    options: type | None = None
    #: HF ``config.model_type`` values whose models this backbone describes
    model_types: tuple[str, ...] = ("bert",)
    #: the fast path concatenates query/key/value into one GEMM (False where the arch already fuses them)
    fuses_qkv = True
    #: runs the layers (:meth:`runner` builds one for a model)
    runner_class: type[LayerRunner] = LayerRunner

    # ---------------------------------------------------------------- building
    def hf_config(self, model_cfg, vocab_size: int, ids: dict[str, int]):
        """The HF config (SDPA attention) for a vocabulary of ``vocab_size`` tokens; ``ids``: the tokenizer's
        ``pad``, ``cls`` and ``sep`` ids."""
        from pretrain.model import bert_config

        return bert_config(model_cfg, vocab_size, ids["pad"])

    def model_class(self):
        from transformers import BertForMaskedLM

        return BertForMaskedLM

    def masked_lm(self, model_cfg, vocab_size: int, ids: dict[str, int]) -> nn.Module:
        """The stock ``*ForMaskedLM`` model that is trained and exported."""
        return self.model_class()(self.hf_config(model_cfg, vocab_size, ids))

    # ---------------------------------------------------------------- parts
    def encoder(self, model: nn.Module) -> nn.Module:
        """The base encoder: ``forward(input_ids, attention_mask)`` -> ``last_hidden_state`` [B, L, H] (final norm
        included)."""
        return model.bert

    def embeddings(self, model: nn.Module) -> nn.Module:
        """The stem: ``forward(input_ids=ids [B, L])`` -> hidden [B, L, H]."""
        return self.encoder(model).embeddings

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.encoder(model).encoder.layer)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """What the encoder applies after its last layer (identity: post-LN layers end normalised)."""
        return nn.Identity()

    def head(self, model: nn.Module) -> nn.Module:
        """The MLM prediction head with the decoder: gathered hidden rows [M, H] -> logits [M, V]."""
        return model.cls

    def decoder(self, model: nn.Module) -> nn.Linear:
        """The vocabulary projection (tied to the word embeddings unless untied)."""
        return model.cls.predictions.decoder

    def word_embeddings(self, model: nn.Module) -> nn.Embedding:
        return self.encoder(model).embeddings.word_embeddings

    def fused_stacks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer stacks whose ``.encoder`` the fast path replaces by a ``FusedEncoder``."""
        return [self.encoder(model)] if self.fuses_qkv else []

    def runner(self, model: nn.Module) -> LayerRunner:
        """The layer runner of ``model`` (a plain object that reads the model's config and buffers)."""
        return self.runner_class(model.config)

    def norm_eps(self, config) -> float:
        return config.layer_norm_eps

    # ---------------------------------------------------------------- tying
    def untie(self, model: nn.Module) -> None:
        """Give the decoder its own matrix (a copy of the word embeddings, so the initial model is the same function)
        and mark the config untied, so exports reload untied."""
        decoder, embeddings = self.decoder(model), self.word_embeddings(model)
        if decoder.weight is embeddings.weight:
            decoder.weight = nn.Parameter(embeddings.weight.detach().clone())
        model.config.tie_word_embeddings = False

    def export_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy for export; an untied decoder also gets its own bias tensor (``transformers`` ties
        ``decoder.bias`` to the head's ``bias`` only with tied embeddings)."""
        model = copy.deepcopy(model)
        if not model.config.tie_word_embeddings:
            head = self.head_with_bias(model)
            head.decoder.bias = nn.Parameter(head.bias.detach().clone())
        return model

    def head_with_bias(self, model: nn.Module) -> nn.Module:
        """The module holding ``decoder`` and the output ``bias`` it shares (BERT: ``cls.predictions``)."""
        return model.cls.predictions

    def token_classifier(self, model: nn.Module) -> nn.Module:
        """A ``*ForTokenClassification``'s head after the encoder (final norm included): [B, L, H] -> [B, L, labels]
        (a view of the model's own modules; BERT, RoBERTa: dropout -> linear)."""
        return nn.Sequential(self.final_norm(model), model.dropout, model.classifier)

    # ---------------------------------------------------------------- fresh modules (decoupled chunks)
    def aux_transform(self, config) -> nn.Module:
        """A fresh prediction-head transform [M, H] -> [M, H] (the head of a non-final chunk, before its own
        decoder): BERT's dense -> GeLU -> LayerNorm."""
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        return BertPredictionHeadTransform(config)

    def extra_layer(self, config, dropout: bool = True) -> nn.Module:
        """A fresh transformer layer that :meth:`runner`'s context runs; ``dropout`` False: none at all (no RNG
        draws)."""
        from transformers.models.bert.modeling_bert import BertLayer

        if not dropout:
            config = copy.deepcopy(config)
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        return BertLayer(config)


class RobertaBackbone(Backbone):
    """RoBERTa (``RobertaForMaskedLM``: ``.roberta``, head ``.lm_head``). Its layers are BERT's; position ids come
    from the input ids (pad_id + 1, pad_id + 2, ...; padding keeps pad_id), so its position table has
    ``max_position_embeddings + pad_id + 1`` rows, and it has one token type."""

    name = "roberta"
    model_types = ("roberta",)

    def hf_config(self, model_cfg, vocab_size: int, ids: dict[str, int]):
        from transformers import RobertaConfig

        from pretrain.model import shared_settings

        settings = shared_settings(model_cfg, vocab_size, ids["pad"])
        settings["max_position_embeddings"] = model_cfg.max_position_embeddings + ids["pad"] + 1
        config = RobertaConfig(hidden_size=model_cfg.hidden_size, num_attention_heads=model_cfg.num_heads,
                               intermediate_size=model_cfg.intermediate_size, type_vocab_size=1,
                               bos_token_id=ids["cls"], eos_token_id=ids["sep"], **settings)
        config._attn_implementation = "sdpa"
        return config

    def model_class(self):
        from transformers import RobertaForMaskedLM

        return RobertaForMaskedLM

    def encoder(self, model):
        return model.roberta

    def head(self, model):
        return model.lm_head

    def decoder(self, model):
        return model.lm_head.decoder

    def head_with_bias(self, model):
        return model.lm_head



class ModernBertHead(nn.Module):
    """``ModernBertForMaskedLM``'s ``head`` (dense -> act -> norm) then its ``decoder``, as one [M, H] -> [M, V]
    module (a view of the model's own modules)."""

    def __init__(self, head: nn.Module, decoder: nn.Linear):
        super().__init__()
        self.head, self.decoder = head, decoder

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.head(hidden))


class ModernBertBackbone(Backbone):
    """ModernBERT (Warner et al. 2024; ``ModernBertForMaskedLM``: ``.model``, ``.head``, ``.decoder``): pre-LN
    layers without biases, GeGLU, RoPE, local/global attention (``model.modernbert``), a final LayerNorm.
    ``model.hidden_dropout`` maps to its embedding and MLP dropouts, ``model.attention_dropout`` to its attention
    dropout (ModernBERT trains with all three at 0). The RoPE has no table, so ``max_position_embeddings`` only
    records the longest block."""

    name = "modernbert"
    options = ModernBertOptions
    model_types = ("modernbert",)
    fuses_qkv = False  # ModernBertAttention.Wqkv is one [3H, H] GEMM already
    runner_class = ModernBertRunner

    def hf_config(self, model_cfg, vocab_size: int, ids: dict[str, int]):
        from transformers import ModernBertConfig

        arch = model_cfg.modernbert
        every = arch.global_attn_every_n_layers
        layer_types = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(model_cfg.num_layers)]
        config = ModernBertConfig(
            vocab_size=vocab_size, hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads, intermediate_size=model_cfg.intermediate_size,
            max_position_embeddings=model_cfg.max_position_embeddings, layer_types=layer_types,
            local_attention=arch.local_attention, norm_eps=arch.norm_eps,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": arch.global_rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": arch.local_rope_theta}},
            embedding_dropout=model_cfg.hidden_dropout, mlp_dropout=model_cfg.hidden_dropout,
            attention_dropout=model_cfg.attention_dropout, pad_token_id=ids["pad"], bos_token_id=ids["cls"],
            eos_token_id=ids["sep"], cls_token_id=ids["cls"], sep_token_id=ids["sep"])
        config._attn_implementation = "sdpa"
        return config

    def model_class(self):
        from transformers import ModernBertForMaskedLM

        return ModernBertForMaskedLM

    def encoder(self, model):
        return model.model

    def layers(self, model):
        return list(model.model.layers)

    def final_norm(self, model):
        return model.model.final_norm

    def head(self, model):
        return ModernBertHead(model.head, model.decoder)

    def decoder(self, model):
        return model.decoder

    def word_embeddings(self, model):
        return model.model.embeddings.tok_embeddings

    def runner(self, model):
        return ModernBertRunner(model.config, model.model.rotary_emb)

    def norm_eps(self, config):
        return config.norm_eps

    def export_copy(self, model):
        """A deep copy (the decoder has its own bias, tied or not)."""
        return copy.deepcopy(model)

    def token_classifier(self, model):
        """Final norm -> prediction head (dense -> act -> norm) -> dropout -> linear."""
        return nn.Sequential(model.model.final_norm, model.head, model.drop, model.classifier)

    def aux_transform(self, config):
        """ModernBERT's style: the final LayerNorm the chunk's pre-LN stack lacks, then its prediction head
        (dense -> act -> norm)."""
        from transformers.models.modernbert.modeling_modernbert import ModernBertPredictionHead

        return nn.Sequential(nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias),
                             ModernBertPredictionHead(config))

    def extra_layer(self, config, dropout: bool = True):
        """A global-attention layer (with its attention LayerNorm, as every layer but the first has)."""
        from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer

        config = copy.deepcopy(config)
        config.layer_types = ["full_attention", "full_attention"]
        if not dropout:
            config.attention_dropout = config.mlp_dropout = 0.0
        return ModernBertEncoderLayer(config, layer_idx=1)


#: ``model.arch`` -> its backbone
BACKBONES: dict[str, Backbone] = {b.name: b for b in (Backbone(), RobertaBackbone(), ModernBertBackbone())}


def backbone_of(model_or_config) -> Backbone:
    """The backbone of a stock model (or its HF config), by ``model_type``; ELECTRA's BERT-shaped networks run
    as BERT's."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = "bert" if config.model_type == "electra" else config.model_type
    for backbone in BACKBONES.values():
        if model_type in backbone.model_types:
            return backbone
    raise ValueError(f"no backbone for model_type '{config.model_type}'; known: "
                     f"{', '.join(t for b in BACKBONES.values() for t in b.model_types)}")

