"""Stock ``transformers`` encoders built from our :class:`~pretrain.config.ModelConfig`."""

from __future__ import annotations

from transformers import BertConfig, ElectraConfig


def shared_settings(model_cfg, vocab_size: int, pad_id: int) -> dict:
    """The keyword arguments ``BertConfig`` and ``ElectraConfig`` take alike from ``model_cfg``."""
    return dict(vocab_size=vocab_size, num_hidden_layers=model_cfg.num_layers,
                max_position_embeddings=model_cfg.max_position_embeddings,
                hidden_dropout_prob=model_cfg.hidden_dropout,
                attention_probs_dropout_prob=model_cfg.attention_dropout, pad_token_id=pad_id)


def bert_config(model_cfg, vocab_size: int, pad_id: int) -> BertConfig:
    """A ``BertConfig`` with SDPA attention for a vocabulary of ``vocab_size`` tokens."""
    config = BertConfig(
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size,
        **shared_settings(model_cfg, vocab_size, pad_id),
    )
    config._attn_implementation = "sdpa"
    return config


def electra_config(
    model_cfg, vocab_size: int, pad_id: int, hidden_size: int | None = None, num_heads: int | None = None,
    intermediate_size: int | None = None,
) -> ElectraConfig:
    """An ``ElectraConfig``; ``hidden_size``/``num_heads``/``intermediate_size`` override the model's (generator)."""
    config = ElectraConfig(
        embedding_size=model_cfg.embedding_size or model_cfg.hidden_size,
        hidden_size=hidden_size or model_cfg.hidden_size,
        num_attention_heads=num_heads or model_cfg.num_heads,
        intermediate_size=intermediate_size or model_cfg.intermediate_size,
        **shared_settings(model_cfg, vocab_size, pad_id),
    )
    config._attn_implementation = "sdpa"
    return config


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
