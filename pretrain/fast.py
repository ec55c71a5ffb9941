"""The fast path (``model.fast``, DESIGN.md §6): static shapes, fused encoders, a compiled step; HF parameters.

What it changes, and what it keeps:

* The objective gathers the predicted positions into a fixed number of rows (``Objective.static_shapes``: M = batch
  x the masking's per-block bound, from ``torch.nonzero_static``; padding rows have target -100 and add nothing),
  so the step has no data-dependent shapes and no host sync. This needs a static masked count:
  ``objective.mlm.static_count: true`` (as BERT's reference data pipeline, which masks round(0.15 n) tokens per
  sequence), SpanBERT's exact budget or ELECTRA's static count. Bernoulli MLM keeps dynamic shapes (a warning says so).
* Attention without a mask on packed blocks: the collator records whether a batch has padding (``padded``,
  known on the host when it is built) and the objectives then pass no attention mask at all
  (:func:`objectives.base.encoder_attention_mask`). HF drops an all-ones mask itself only in eager mode (with a
  host sync, ``mask.all()``); under ``torch.compile`` it keeps the [B, 1, L, L] mask, and a masked SDPA call with
  dropout cannot use the flash kernel (DESIGN.md §6 profiled it falling back to a decomposed fp32 attention).
* Each BERT-shaped encoder's layer stack (BERT, RoBERTa, ELECTRA: ``Objective.encoders``) is run by
  :class:`FusedEncoder`: one [3H, H] GEMM for query/key/value instead of three
  (the weights are concatenated inside the step, so the parameters stay HF's ``query``/``key``/``value``), then
  SDPA and HF's own output/intermediate modules. Bias + GeLU and dropout + residual + LayerNorm are left to the
  compiler, which fuses each into one elementwise kernel. An arch whose layers already project query/key/value with
  one GEMM (ModernBERT's ``Wqkv``) has no stack to fuse and keeps its layers.
* :func:`compile_step`: the step's whole forward (encoders, prediction heads, losses and, for ELECTRA, the Gumbel
  sampling over [M, V]) is compiled as one graph with ``nn.Module.compile`` on the trainer's module, after
  accelerate has wrapped it (all three objectives trace without a graph break): the [M, V] cross-entropy and noise
  are fused instead of materialised in fp32, and parameter names, checkpoints and exports are exactly those of the
  eager model. Under DDP the wrapper itself is compiled, so dynamo's DDP optimizer cuts the graph at the gradient
  buckets and their all-reduces overlap the backward (a graph compiled inside DDP would hand over every gradient
  only at its end). Encoders called outside the step (evaluation helpers, export checks) run eagerly.
* SDPA attention, fused AdamW on CUDA and bf16 (``train.precision``) are the trainer's defaults anyway.

The decoupled runtimes (``decouple.mode`` local/synthetic) get the same levers per chunk
(:func:`apply_fast_path_to_chunks`): static-shape heads, fused layers (auxiliary heads' extra layer and ELECTRA's
generator included) and each chunk's forward compiled as its own graph.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as EncoderOutput

log = logging.getLogger(__name__)


#: the oldest torch the fast path runs on: ``torch.nonzero_static`` on CUDA came with 2.6, dynamo's
#: ``recompile_limit`` (the name used here) with 2.7
MIN_TORCH = (2, 7)


def check_torch_version() -> None:
    """Refuse the fast path on a torch older than :data:`MIN_TORCH`, naming both ways out."""
    if not torch.__version__ >= MIN_TORCH:
        raise RuntimeError(f"model.fast needs torch >= {'.'.join(map(str, MIN_TORCH))} (torch.nonzero_static on "
                           f"CUDA, dynamo's recompile_limit), found {torch.__version__}: upgrade torch, or set "
                           "model.fast: false")


def fast_enabled(model_cfg, device: torch.device) -> bool:
    """``model.fast``, with null meaning "on when the model trains on a CUDA device" (and torch is recent enough:
    else off, with a warning); an explicit true on an older torch is an error."""
    if model_cfg.fast is None:
        if device.type == "cuda" and not torch.__version__ >= MIN_TORCH:
            log.warning("model.fast is off: it needs torch >= %s, found %s", ".".join(map(str, MIN_TORCH)),
                        torch.__version__)
            return False
        return device.type == "cuda"
    if model_cfg.fast:
        check_torch_version()
    return bool(model_cfg.fast)


class FusedEncoder(nn.Module):
    """Runs the ``layer`` list of a ``BertEncoder``/``RobertaEncoder``/``ElectraEncoder`` with one query/key/value
    GEMM per layer.

    Holds the very same layer modules under the same attribute name, so every parameter keeps its HF name
    (``encoder.layer.{i}.attention.self.query.weight`` ...) and the exported checkpoint is unchanged. Computes what
    HF's SDPA layer computes (checked in tests/test_fast.py): hidden [B, L, H], ``attention_mask`` None or HF's
    boolean [B, 1, L, L] (True = attend) -> HF's encoder output with ``last_hidden_state`` [B, L, H]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        config = encoder.config
        if config.is_decoder or config.add_cross_attention or config.chunk_size_feed_forward:
            raise ValueError("FusedEncoder runs bidirectional self-attention encoders only (no decoder, cross "
                             "attention or chunked feed-forward)")
        self.config = config
        self.layer = encoder.layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> EncoderOutput:
        for layer in self.layer:
            hidden_states = self.layer_forward(layer, hidden_states, attention_mask)
        return EncoderOutput(last_hidden_state=hidden_states)

    @staticmethod
    def layer_forward(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One HF ``BertLayer``/``ElectraLayer`` (post-LN): y = LN(x + drop(O attn(x))), LN(y + drop(W2 gelu(W1 y)))."""
        attention = layer.attention.self
        batch, length, _ = hidden.shape
        weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])  # [3H', H]
        bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
        qkv = F.linear(hidden, weight, bias).view(batch, length, 3, attention.num_attention_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=attention.scaling,
            dropout_p=attention.dropout.p if layer.training else 0.0)
        context = context.transpose(1, 2).reshape(batch, length, -1)
        hidden = layer.attention.output(context, hidden)  # dense, dropout, LayerNorm(. + hidden)
        return layer.output(layer.intermediate(hidden), hidden)


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask, fused: bool) -> torch.Tensor:
    """One HF ``BertLayer``/``RobertaLayer``/``ElectraLayer`` on hidden [B, L, H]; ``fused`` (the fast path): through
    :meth:`FusedEncoder.layer_forward` (one query/key/value GEMM, the same parameters)."""
    return FusedEncoder.layer_forward(layer, hidden, mask) if fused else layer(hidden, mask)


def fuse_encoders(encoders: list[nn.Module]) -> None:
    """Replace each transformer stack's ``encoder`` by a :class:`FusedEncoder` over the same layers (in place;
    ``state_dict`` keys and values unchanged). ``encoders``: e.g. ``objective.encoders(model)``."""
    for stack in encoders:
        if not isinstance(stack.encoder, FusedEncoder):
            stack.encoder = FusedEncoder(stack.encoder)


def apply_fast_path(model: nn.Module, objective: nn.Module, block_size: int, fuse: bool = True) -> None:
    """Switch ``objective`` to static shapes and fuse ``model``'s transformer stacks (``fuse``), in place (no new
    parameters, no renamed ones). Then wrap both (``PretrainModule``, accelerate) and :func:`compile_step`."""
    check_torch_version()
    objective.static_shapes = True
    if objective.max_selected(block_size) is None:
        log.warning("model.fast: the masked count varies per batch (objective.mlm.static_count is false), so the "
                    "prediction head keeps data-dependent shapes; set objective.mlm.static_count: true for static ones")
    if fuse:
        fuse_encoders(objective.encoders(model))


@contextmanager
def compile_errors_explained():
    """Around a step that may compile: a failure of the compiler (it runs lazily, at the first call) becomes one
    error that names the way out, ``model.fast: false``, with the compiler's own error as its cause."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = e.inner_exception
        raise RuntimeError(f"compiling the fast path failed ({type(inner).__name__}: {str(inner)[:300]}); set "
                           "model.fast: false to train without it (same model, checkpoints and exports)") from e


def compile_step(module: nn.Module) -> None:
    """Compile ``module`` (a ``PretrainModule``, or the DDP wrapper accelerate put around it) in place with static
    shapes: ``module(batch, normalizers)`` becomes one graph, its ``state_dict`` keys stay as they are."""
    module.compile(dynamic=False)


def apply_fast_path_to_chunks(chunked: nn.Module, block_size: int, compile: bool = True) -> None:
    """The fast path of a decoupled ``ChunkedModel`` (in place; parameters, checkpoints and exports unchanged):
    static-shape heads, every chunk's layers and auxiliary heads' extra layer fused, the stock stacks fused (ELECTRA's
    generator runs inside chunk 0), then (``compile``) each chunk's forward compiled as one graph with static shapes.
    A chunk's input hidden states stay a graph input, so the synthetic-gradient runtime still reads their gradient."""
    apply_fast_path(chunked.model, chunked.objective, block_size)
    for head in chunked.aux:
        head.fused = True
    for chunk in chunked.chunks:
        chunk.fused = True
    if compile:
        # the chunks share one forward code object, and each adds its own graphs (train / evaluation, padded or
        # not): keep dynamo's per-code-object limit (8 by default) from sending later chunks back to eager
        limit = 8 * len(chunked.chunks)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for chunk in chunked.chunks:
            chunk.compile(dynamic=False)
