"""ELECTRA (Clark et al., 2020): a small MLM generator and a replaced-token-detection discriminator.

Model (``build_model``): an :class:`ElectraPretrainingModel` holding a generator and a discriminator of the same depth.
The generator is ``generator_size`` times as wide as the discriminator, with hidden // 64 heads (at least 1).

* ``model.arch: bert``: a stock ``ElectraForMaskedLM`` generator with a 4 x hidden feed-forward layer (the
  reference's ``get_generator_config``) and a stock ``ElectraForPreTraining`` discriminator. Token, position and
  token-type embeddings and the embedding LayerNorm are the *same* modules in both networks; each network maps the
  shared embedding width to its own hidden size with its own ``embeddings_project`` where they differ, and the
  generator's output projection is tied to the shared word embeddings.
* ``roberta`` / ``modernbert``: the arch's stock ``*ForMaskedLM`` generator (``objectives.backbones``; its
  feed-forward width is the model's ``intermediate_size`` scaled by ``generator_size``, so each arch keeps its own
  ratio, e.g. ModernBERT's GeGLU 1.5 x) and the arch's stock ``*ForTokenClassification`` discriminator with one
  label: ``logits[..., 0]`` is the replaced-token logit (positive = replaced). These classes have no embedding
  projection, so the embeddings (RoBERTa: token, position, type and LayerNorm; ModernBERT: token and norm) are the
  same module in both networks only where the widths are equal (``generator_size: 1``); a narrower generator has
  its own embeddings (a deviation from the paper, which ties them; its own decoder stays tied to its own table).

Masking (``collate``, CPU): exactly k = round(mask_ratio * n) distinct positions per block among its n non-special
tokens; 85% of them become [MASK], the rest keep the original token (no random tokens), as in the reference's
``pretrain_helpers.mask``. (The reference counts n over all non-pad tokens including [CLS]/[SEP] and draws the
positions with replacement; here k follows DESIGN.md §3 and the positions are distinct.)

Loss (``forward``): generator MLM cross-entropy on the masked positions, through a sparse head (hidden states are
gathered at the M masked positions before the prediction head: [M, V] logits, never [B, L, V]). Replacement tokens
are sampled from the generator's softmax at ``temperature`` with the Gumbel-max trick, in fp32, without gradient
(the sample is an integer; nothing flows back into the generator from the discriminator). The discriminator reads
the original block with the masked positions replaced by the samples; a position is "replaced" only where the sample
differs from the original. Binary cross-entropy over every non-pad position. loss = gen_sum / n_masked +
disc_weight * disc_sum / n_tokens (token-exact: the trainer may pass window-wide normalisers).

Reproducible sampling: the Gumbel noise is not drawn from a device RNG but computed by a counter-based hash of
(seed, global sample index, position in the block, vocabulary id), see :func:`gumbel_noise`. A sample therefore gets
the same replacement tokens whatever the batch it sits in, the number of processes or the device, given the same
generator logits.

Split protocol (``objectives.base``, ``decouple.mode: local`` only: synthetic-gradient modules condition on
masked-token labels): the discriminator is the encoder that is cut (its layers run by the arch's layer runner). The
generator runs inside chunk 0 (:class:`ElectraStem`; it shares the embeddings, which chunk 0 owns), which therefore
also sends the "replaced" labels it sampled ([B, L] uint8) along with the activations: no other chunk could compute
them. Non-final chunks get :class:`LocalRTDHead` (bert) or :class:`LocalTokenRTDHead` (roberta/modernbert, in the
arch's style), the last one the discriminator's own head (:class:`FinalRTDHead`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from pretrain.fast import run_layer
from pretrain.metrics import ROC_PREFIX, roc_histogram

from .backbones import BACKBONES, LayerRunner, backbone_of
from .base import IGNORE_INDEX, Objective, bert_init_, build_options, encoder_attention_mask
from .mlm import MLMConfig, select_tokens


def replaced_token_sums(logits: torch.Tensor, replaced: torch.Tensor, attention_mask: torch.Tensor,
                        with_auc: bool = False):
    """The discriminator's loss: binary cross-entropy (fp32) summed over the non-pad positions, as masked sums (no
    data-dependent shapes). logits [B, L], replaced [B, L] bool/uint8 (never set on padding), attention_mask [B, L].

    Returns ``(disc_sum, counts, metrics)``: counts {n_tokens, n_replaced, n_original}; metrics {disc_acc,
    disc_acc_replaced, disc_acc_original} and, ``with_auc`` (evaluation), the logits' histogram that the metric
    tracker reports as ``disc_auc``: replaced-vs-original ROC AUC, which unlike accuracy at the 0.5 threshold
    shows a discriminator that ranks replaced tokens higher before it ever predicts "replaced"."""
    non_pad, replaced = attention_mask.bool(), replaced.bool()
    bce = F.binary_cross_entropy_with_logits(logits.float(), replaced.float(), reduction="none")
    disc_sum = torch.where(non_pad, bce, 0.0).sum()
    # a replaced token is detected by a positive logit, an original one by a non-positive one (this form, not
    # `(logits > 0) == replaced`, which inductor's CPU code generation fails to compile for a uint8-born mask)
    detached = logits.detach()
    correct = torch.where(replaced, detached > 0, detached <= 0) & non_pad
    n_tokens, n_replaced = non_pad.sum(), replaced.sum()
    n_original = n_tokens - n_replaced
    counts = {"n_tokens": n_tokens, "n_replaced": n_replaced, "n_original": n_original}
    metrics = {"disc_acc": correct.sum() / n_tokens.clamp(min=1),
               "disc_acc_replaced": (correct & replaced).sum() / n_replaced.clamp(min=1),
               "disc_acc_original": (correct & ~replaced).sum() / n_original.clamp(min=1)}
    if with_auc:
        metrics[ROC_PREFIX + "disc_auc"] = roc_histogram(detached, replaced, non_pad)
    return disc_sum, counts, metrics


def _replaced_token_parts(logits: torch.Tensor, replaced: torch.Tensor, attention_mask: torch.Tensor,
                          all_metrics: bool, with_auc: bool = False):
    """:func:`replaced_token_sums` as a head's (sums, counts, metrics); ``all_metrics`` False keeps only n_tokens
    and disc_acc (the auxiliary heads)."""
    total, counts, metrics = replaced_token_sums(logits, replaced, attention_mask, with_auc and all_metrics)
    if not all_metrics:
        counts, metrics = {"n_tokens": counts["n_tokens"]}, {"disc_acc": metrics["disc_acc"]}
    return {"disc_loss": total}, counts, metrics


@dataclass
class ElectraConfig:
    generator_size: float = 0.25
    """Generator hidden size as a fraction of the discriminator's (1/4 default; the paper's base uses 1/3). On
    model.arch roberta/modernbert the two networks share their embeddings only at generator_size 1 (equal widths:
    their classes have no embedding projection); a narrower generator has its own embeddings."""
    mask_ratio: float = 0.15
    """Exactly round(mask_ratio * n) masked positions per block (static count)."""
    mask_token_prob: float = 0.85
    """Of the masked positions, fraction replaced by [MASK] (the rest keep the original token)."""
    disc_weight: float = 50.0
    """Loss = generator MLM + disc_weight * discriminator BCE (the paper's lambda = 50)."""
    temperature: float = 1.0
    """Sampling temperature of the generator (Gumbel-max in fp32)."""

    def __post_init__(self):
        if not self.generator_size > 0:
            raise ValueError(f"objective.electra.generator_size must be > 0, got {self.generator_size}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.electra.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.mask_token_prob <= 1.0:
            raise ValueError(f"objective.electra.mask_token_prob must be in [0, 1], got {self.mask_token_prob}")
        if self.disc_weight < 0:
            raise ValueError(f"objective.electra.disc_weight must be >= 0, got {self.disc_weight}")
        if not self.temperature > 0:
            raise ValueError(f"objective.electra.temperature must be > 0, got {self.temperature}")


# --------------------------------------------------------------------------- counter-based Gumbel noise

_LOW32 = 0xFFFFFFFF


def _as_int32(c: int) -> int:
    """The 32-bit word ``c`` as a two's-complement int32 value."""
    c &= _LOW32
    return c - (1 << 32) if c >= (1 << 31) else c


_MUL1, _MUL2 = _as_int32(0x7FEB352D), _as_int32(0x846CA68B)
_SALT_SEED, _SALT_VOCAB = 0x9E3779B9, _as_int32(0x85EBCA6B)


def _words(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high 32-bit words of a non-negative int64 tensor, as int32 tensors (two's complement)."""
    low, high = x & _LOW32, (x >> 32) & _LOW32
    low, high = low - (low >> 31 << 32), high - (high >> 31 << 32)  # into [-2**31, 2**31): an exact conversion
    return low.to(torch.int32), high.to(torch.int32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash ("lowbias32", C. Wellons' hash-prospector) on int32 tensors.

    Words are int32 in two's complement: products wrap modulo 2**32 (the vectorised integer multiply on CPU and
    GPU), and right shifts are made logical by masking off the sign extension. int32 rather than int64 keeps the
    CPU kernels vectorised (AVX2 has no 64-bit multiply): 4x faster. ``tests/test_electra.py`` checks the result
    against an exact int64 reference."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def row_keys(seed: int, sample_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A 32-bit key (int32) per masked position from (seed, global sample index, position in the block); [R]."""
    low, high = _words(sample_index.long())
    key = _mix32(torch.full_like(low, _as_int32(int(seed) ^ _SALT_SEED)))
    key = _mix32(key ^ low)
    key = _mix32(key ^ high)
    return _mix32(key ^ position.to(torch.int32))


def gumbel_noise(seed: int, sample_index: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [R, V] (fp32) for R masked positions, a pure function of its arguments.

    Entry (r, v) is ``mix(k_r ^ h_v)``: k_r the row key of (seed, sample_index[r], position[r]) (four chained
    mixes) and h_v = mix(v ^ salt); for a fixed row, v -> entry is a bijection of distinct hashed words, so one mix
    per entry suffices. The top 23 bits give u = (j + 0.5) / 2**23, exact in fp32 and strictly inside (0, 1), and
    g = -log(-log u), so g lies in [-2.8, 16.6] (the Gumbel tail beyond is cut off with probability < 1e-7).
    Integer tensor ops on the device of ``sample_index``, no RNG state: the draw of a sample does not depend on the
    batch it sits in, the number of processes or the device."""
    key = row_keys(seed, sample_index, position)
    vocab = _mix32(torch.arange(vocab_size, device=key.device, dtype=torch.int32) ^ _SALT_VOCAB)
    bits = _mix32(key[:, None] ^ vocab[None, :])
    u = (((bits >> 9) & 0x7FFFFF).float() + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def gumbel_sample(
    logits: torch.Tensor, seed: int, sample_index: torch.Tensor, position: torch.Tensor, temperature: float = 1.0,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """One token per row of ``logits`` [R, V] from softmax(logits / temperature): argmax(logits / T + Gumbel noise).

    Runs in fp32 without gradient; rows are processed in chunks of at most ``max_chunk_elements`` noise entries to
    bound the memory of the hash intermediates. Returns [R] int64."""
    rows, vocab_size = logits.shape
    step = max(1, max_chunk_elements // max(1, vocab_size))
    out = []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        noise = gumbel_noise(seed, sample_index[start:stop], position[start:stop], vocab_size)
        out.append((logits[start:stop].float() / temperature + noise).argmax(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=logits.device)


# --------------------------------------------------------------------------- model


class ElectraPretrainingModel(nn.Module):
    """The two stock networks trained together, sharing one embedding module (``generator.electra.embeddings is
    discriminator.electra.embeddings``; on roberta/modernbert only where the widths are equal).

    Attributes: ``generator`` (``ElectraForMaskedLM`` or the arch's ``*ForMaskedLM``) and ``discriminator``
    (``ElectraForPreTraining`` or the arch's one-label ``*ForTokenClassification``). There is no ``forward``:
    :class:`ElectraObjective` runs the sparse generator head, the sampling and the discriminator."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module):
        super().__init__()
        # the generator's own embeddings are discarded: both networks read the discriminator's embedding module
        if is_electra(discriminator):
            generator.electra.embeddings = discriminator.electra.embeddings
            generator.tie_weights()  # re-tie generator_lm_head.weight to the (now shared) word embeddings
        elif generator.config.hidden_size == discriminator.config.hidden_size:
            backbone = backbone_of(discriminator)
            backbone.encoder(generator).embeddings = backbone.embeddings(discriminator)
            generator.tie_weights()  # re-tie the decoder to the (now shared) word embeddings
        self.generator = generator
        self.discriminator = discriminator

    @property
    def config(self):
        """The discriminator's config (the model that is kept after pretraining)."""
        return self.discriminator.config

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by both networks: the embedding tables and the embedding LayerNorm (none where a
        narrower roberta/modernbert generator has its own embeddings)."""
        generator = {id(p) for p in self.generator.parameters()}
        return [p for p in self.discriminator.parameters() if id(p) in generator]


def is_electra(model: nn.Module) -> bool:
    """Whether ``model`` is one of ELECTRA's own (BERT-shaped) classes, the networks of ``model.arch: bert``."""
    return model.config.model_type == "electra"


def generator_shape(hidden_size: int, generator_size: float) -> tuple[int, int, int]:
    """(hidden, heads, intermediate) of the generator as in the reference's ``get_generator_config``."""
    hidden = int(round(hidden_size * generator_size))
    heads = max(1, hidden // 64)
    if hidden < 1 or hidden % heads:
        raise ValueError(
            f"objective.electra.generator_size={generator_size} gives a generator hidden size of {hidden} "
            f"(round({hidden_size} x {generator_size})), which its {heads} heads (hidden // 64) do not divide; "
            "choose a generator_size that gives, e.g., a hidden size below 128 or a multiple of 64"
        )
    return hidden, heads, 4 * hidden


def generator_logits(generator: nn.Module, batch: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The generator's sparse MLM head: its encoder's states gathered at the M flat positions ``index`` into
    [B, L], then the prediction head and the decoder: [M, V]."""
    mask = encoder_attention_mask(batch)
    if is_electra(generator):
        hidden = generator.electra(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return generator.generator_lm_head(generator.generator_predictions(hidden.flatten(0, 1)[index]))
    backbone = backbone_of(generator)
    hidden = backbone.encoder(generator)(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    return backbone.head(generator)(hidden.flatten(0, 1)[index])


def discriminator_logits(discriminator: nn.Module, input_ids: torch.Tensor,
                         batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The replaced-token logit per position [B, L] (positive = replaced): ``ElectraForPreTraining``'s logits, or
    label 0 of a one-label ``*ForTokenClassification``."""
    logits = discriminator(input_ids=input_ids, attention_mask=encoder_attention_mask(batch)).logits
    return logits if is_electra(discriminator) else logits[..., 0]


# --------------------------------------------------------------------------- decoupled pieces (split protocol)


class ElectraStem(nn.Module):
    """ELECTRA's generator (sparse MLM head, Gumbel-max sampling, no gradient through the sample) followed by the
    discriminator's embeddings of the corrupted block [B, L, H]. Carries ``replaced`` [B, L] uint8 to the upper
    chunks."""

    metric_counts = {"gen_loss": "n_masked", "gen_acc": "n_masked", "replaced_frac": "n_masked"}

    def __init__(self, model: ElectraPretrainingModel, objective: "ElectraObjective"):
        super().__init__()
        self.generator = model.generator
        if is_electra(model.discriminator):
            self.embeddings = model.discriminator.electra.embeddings
            self.project = getattr(model.discriminator.electra, "embeddings_project", None)
        else:
            self.embeddings, self.project = backbone_of(model.discriminator).embeddings(model.discriminator), None
        self.generate = objective.generate  # a bound method: plain attribute, not a submodule
        self.loss_parts = {"gen_loss": objective.loss_parts["gen_loss"]}

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
        return embedded, carry, {"gen_loss": gen_sum}, {"n_masked": n_masked}, metrics


class LocalRTDHead(nn.Module):
    """Auxiliary replaced-token-detection head of a non-final discriminator chunk:
    ``[ElectraLayer] → dense → GeLU → dense → 1 logit per token``, weighted by ``disc_weight``."""

    metric_counts = {"disc_loss": "n_tokens", "disc_acc": "n_tokens"}
    fused = False  #: run the extra layer through FusedEncoder (the fast path)

    def __init__(self, config, extra_layer: bool, disc_weight: float):
        super().__init__()
        from transformers.models.electra.modeling_electra import ElectraLayer

        self.layer = ElectraLayer(config) if extra_layer else None
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)
        self.loss_parts = {"disc_loss": ("n_tokens", disc_weight)}
        bert_init_(self, config.initializer_range)

    def forward(self, hidden, mask, batch, carry):
        if self.layer is not None:
            hidden = run_layer(self.layer, hidden, mask, self.fused)
        logits = self.dense_prediction(F.gelu(self.dense(hidden))).squeeze(-1)
        return _replaced_token_parts(logits, carry["replaced"], batch["attention_mask"], False)


class LocalTokenRTDHead(nn.Module):
    """Auxiliary replaced-token-detection head of a non-final roberta/modernbert discriminator chunk, in the arch's
    style (``Backbone.extra_layer``/``aux_transform``): ``[a transformer layer] → transform (RoBERTa: dense → GeLU →
    LayerNorm; ModernBERT: LayerNorm, its prediction head) → linear → 1 logit per token``, weighted by
    ``disc_weight``."""

    metric_counts = LocalRTDHead.metric_counts
    fused = False  #: run the extra layer through FusedEncoder (the fast path)

    def __init__(self, config, extra_layer: bool, disc_weight: float):
        super().__init__()
        backbone = backbone_of(config)
        self.run_layer = backbone.runner_class.run  # runs the extra layer with the chunk's layer context
        self.layer = backbone.extra_layer(config) if extra_layer else None
        self.transform = backbone.aux_transform(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.loss_parts = {"disc_loss": ("n_tokens", disc_weight)}
        bert_init_(self, config.initializer_range)

    def forward(self, hidden, context, batch, carry):
        if self.layer is not None:
            hidden = self.run_layer(self.layer, hidden, context, self.fused)
        logits = self.classifier(self.transform(hidden)).squeeze(-1)
        return _replaced_token_parts(logits, carry["replaced"], batch["attention_mask"], False)


class ReplacedLogit(nn.Module):
    """Label 0 of a one-label token classifier head (``Backbone.token_classifier``): [B, L, H] -> [B, L]."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)[..., 0]


class FinalRTDHead(nn.Module):
    """ELECTRA's discriminator head (``ElectraForPreTraining.discriminator_predictions``; roberta/modernbert: the
    token classifier's final norm, head and linear as a :class:`ReplacedLogit`) on the last chunk."""

    metric_counts = {"disc_loss": "n_tokens", "disc_acc": "n_tokens", "disc_acc_replaced": "n_replaced",
                     "disc_acc_original": "n_original"}

    def __init__(self, predictions: nn.Module, disc_weight: float):
        super().__init__()
        self.predictions = predictions
        self.loss_parts = {"disc_loss": ("n_tokens", disc_weight)}

    def forward(self, hidden, mask, batch, carry):
        return _replaced_token_parts(self.predictions(hidden), carry["replaced"], batch["attention_mask"], True,
                                     with_auc=not self.training)


# --------------------------------------------------------------------------- objective


class ElectraObjective(Objective):
    """Replaced-token detection with a jointly trained MLM generator (model: :class:`ElectraPretrainingModel`)."""

    name = "electra"
    metric_counts = {
        "gen_loss": "n_masked",
        "gen_acc": "n_masked",
        "disc_loss": "n_tokens",
        "disc_acc": "n_tokens",
        "disc_acc_replaced": "n_replaced",
        "disc_acc_original": "n_original",
        "replaced_frac": "n_masked",
    }

    #: fallback sample indices (examples without ``index``) start here, away from real stream positions
    FALLBACK_INDEX_START = 1 << 56

    def __init__(self, tokenizer, seed: int = 0, **options: Any):
        super().__init__(tokenizer, seed)
        self.config = build_options(ElectraConfig, options, "objective.electra")
        self.loss_parts = {"gen_loss": ("n_masked", 1.0), "disc_loss": ("n_tokens", self.config.disc_weight)}
        self._selection = MLMConfig(mask_ratio=self.config.mask_ratio, static_count=True)
        self._next_fallback_index = self.FALLBACK_INDEX_START

    # ---------------------------------------------------------------- masking (CPU, DataLoader workers)
    def mask_example(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        gen = self._generator(example)
        selected = select_tokens(self.candidate_mask(ids), self._word_ids(example, len(ids)), self._selection, gen)
        positions = torch.nonzero(selected).squeeze(1)
        to_mask = positions[torch.rand(len(positions), generator=gen) < self.config.mask_token_prob]
        masked = ids.clone()
        masked[to_mask] = self.mask_id
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        return {"input_ids": masked, "labels": labels, "original_ids": ids}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """examples: dicts with ``input_ids`` [L], optional ``word_ids`` [L] and ``index``. Returns [B, L] tensors
        ``input_ids`` (masked), ``labels`` (original id at masked positions, -100 elsewhere), ``original_ids``
        (unmasked, pad-filled), ``attention_mask``, and ``sample_index`` [B] (the examples' ``index``, else a
        per-objective counter from 2**56; it keys the generator's Gumbel noise). Pass ``index`` for reproducible
        batches: the fallback counter (like the fallback masking generator) lives in each DataLoader worker."""
        batch = self.pad_and_stack([self.mask_example(e) for e in examples])
        batch["original_ids"].masked_fill_(batch["attention_mask"] == 0, self.pad_id)
        indices = []
        for e in examples:
            if e.get("index") is not None:
                indices.append(int(e["index"]))
            else:
                indices.append(self._next_fallback_index)
                self._next_fallback_index += 1
        batch["sample_index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    # ---------------------------------------------------------------- loss
    def counts(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The normalisers: masked positions (generator) and non-pad tokens (discriminator). The counts of
        replaced/original positions depend on the generator's samples and come with ``forward``'s output."""
        return {"n_masked": (batch["labels"] != IGNORE_INDEX).sum(), "n_tokens": batch["attention_mask"].sum()}

    def sample(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], index: torch.Tensor,
               block_len: int) -> torch.Tensor:
        """Replacement tokens [M] for the flat masked positions ``index`` [M] into [B, L] blocks of ``block_len``
        tokens, from ``logits`` [M, V]: Gumbel-max at ``temperature``, fp32, no gradient, noise keyed by (seed,
        sample index, position)."""
        if "sample_index" not in batch:
            raise KeyError("the ELECTRA batch has no 'sample_index'; build batches with ElectraObjective.collate")
        sample_index = batch["sample_index"].to(logits.device)[index // block_len]
        return gumbel_sample(logits.detach(), self.seed, sample_index, index % block_len, self.config.temperature)

    def generate(self, generator: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator half of the step (also the decoupled runtime's chunk 0): sparse MLM head on the masked
        positions, replacements sampled without gradient, the corrupted block.

        Returns {gen_sum (with graph), gen_correct, selected [B, L] bool, sampled [M], sampled_valid [M] bool (False
        on padding rows of ``static_shapes``), disc_input_ids [B, L], replaced [B, L] bool (sample != original)}."""
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)  # [M] flat positions (M fixed under static_shapes)
        logits = generator_logits(generator, batch, index)  # [M, V]
        gen_sum, gen_correct = self.masked_lm_sums(logits, self.gather_targets(batch["labels"], index, valid))

        # corrupt the block with the generator's samples; an integer sample carries no gradient back
        sampled = self.sample(logits, batch, index, selected.shape[1])
        original = batch["original_ids"]
        flat = original.flatten()
        # add (sample - original) at the valid positions; padding rows add 0 (their index 0 may repeat)
        delta = torch.where(valid, sampled - flat[index], 0)
        disc_ids = (flat + torch.zeros_like(flat).index_put_((index,), delta, accumulate=True)).view_as(original)
        return {"gen_sum": gen_sum, "gen_correct": gen_correct, "selected": selected, "sampled": sampled,
                "sampled_valid": valid, "disc_input_ids": disc_ids,
                "replaced": disc_ids != original}  # a sampled original token counts as "original"

    def max_selected(self, block_len: int) -> int:
        """round(mask_ratio * L): the static count of a full block (a block with n <= L candidates masks fewer)."""
        return round(self.config.mask_ratio * block_len)

    def loss_sums(self, model: ElectraPretrainingModel, batch: Mapping[str, torch.Tensor]):
        """The step's summed losses (with graph), counts, per-batch metrics and detached internals.

        Returns ``(sums, counts, metrics, aux)``: sums {gen_loss, disc_loss}; counts {n_masked, n_tokens,
        n_replaced, n_original}; metrics {gen_acc, disc_acc, disc_acc_replaced, disc_acc_original, replaced_frac};
        aux {sampled [M], sampled_valid [M] bool (False on padding rows of ``static_shapes``), disc_input_ids
        [B, L], replaced [B, L] bool, disc_logits [B, L]}."""
        attention_mask = batch["attention_mask"]
        gen = self.generate(model.generator, batch)
        gen_sum, gen_correct, selected = gen["gen_sum"], gen["gen_correct"], gen["selected"]
        disc_ids, replaced = gen["disc_input_ids"], gen["replaced"]

        disc_logits = discriminator_logits(model.discriminator, disc_ids, batch)  # [B, L]
        disc_sum, disc_counts, disc_metrics = replaced_token_sums(disc_logits, replaced, attention_mask,
                                                                  with_auc=not self.training)
        n_masked = selected.sum()
        counts = {"n_masked": n_masked, **disc_counts}
        metrics = {"gen_acc": gen_correct / n_masked.clamp(min=1), **disc_metrics,
                   "replaced_frac": disc_counts["n_replaced"] / n_masked.clamp(min=1)}
        aux = {"sampled": gen["sampled"], "sampled_valid": gen["sampled_valid"], "disc_input_ids": disc_ids,
               "replaced": replaced, "disc_logits": disc_logits.detach()}
        return {"gen_loss": gen_sum, "disc_loss": disc_sum}, counts, metrics, aux

    def forward(self, model: ElectraPretrainingModel, batch: Mapping[str, torch.Tensor], normalizers=None) -> dict:
        """Returns ``loss`` = gen_sum / N_masked + disc_weight * disc_sum / N_tokens (N: ``normalizers`` or this
        batch's counts), the detached means ``gen_loss``/``disc_loss``, the metrics of ``metric_counts`` and the
        counts ``n_masked``, ``n_tokens``, ``n_replaced``, ``n_original`` (the last two only known after sampling)."""
        sums, counts, metrics, _ = self.loss_sums(model, batch)
        return self.reduce(sums, counts, normalizers, metrics)

    # ---------------------------------------------------------------- model / export
    def build_model(self, model_config) -> ElectraPretrainingModel:
        """``model.arch: bert``: ELECTRA's own classes; roberta/modernbert: the arch's ``*ForMaskedLM`` generator
        and one-label ``*ForTokenClassification`` discriminator (see the module docstring)."""
        if model_config.arch != "bert":
            return self._build_backbone_model(model_config)
        from transformers import ElectraForMaskedLM, ElectraForPreTraining

        from pretrain.model import electra_config

        hidden, heads, intermediate = generator_shape(model_config.hidden_size, self.config.generator_size)
        gen_config = electra_config(model_config, self.vocab_size, self.pad_id, hidden, heads, intermediate)
        disc_config = electra_config(model_config, self.vocab_size, self.pad_id)
        return ElectraPretrainingModel(ElectraForMaskedLM(gen_config), ElectraForPreTraining(disc_config))

    def _build_backbone_model(self, model_config) -> ElectraPretrainingModel:
        import dataclasses

        from transformers import AutoModelForTokenClassification

        arch = model_config.arch
        if model_config.embedding_size not in (None, model_config.hidden_size):
            raise ValueError(f"model.embedding_size={model_config.embedding_size} needs an embedding projection, "
                             f"which model.arch={arch} has not: leave it null (ELECTRA on model.arch=bert has one)")
        backbone, ids = BACKBONES[arch], {"pad": self.pad_id, "cls": self.cls_id, "sep": self.sep_id}
        hidden, heads, _ = generator_shape(model_config.hidden_size, self.config.generator_size)
        intermediate = max(1, round(model_config.intermediate_size * hidden / model_config.hidden_size))
        gen_model = dataclasses.replace(model_config, hidden_size=hidden, num_heads=heads,
                                        intermediate_size=intermediate)
        disc_config = backbone.hf_config(model_config, self.vocab_size, ids)
        disc_config.num_labels = 1
        generator = backbone.masked_lm(gen_model, self.vocab_size, ids)
        return ElectraPretrainingModel(generator, AutoModelForTokenClassification.from_config(disc_config))

    def export(self, model: nn.Module, out_dir, tokenizer) -> None:
        """``out_dir/discriminator`` (``ElectraForPreTraining``; roberta/modernbert: the one-label
        ``*ForTokenClassification``) and ``out_dir/generator`` (``ElectraForMaskedLM`` / ``*ForMaskedLM``), each with
        its own copy of the shared embeddings and the tokenizer, loadable standalone."""
        from pretrain.hf_io import save_hf, unwrap

        model = unwrap(model)
        out_dir = Path(out_dir)
        save_hf(model.discriminator, out_dir / "discriminator", tokenizer)
        save_hf(model.generator, out_dir / "generator", tokenizer)

    def export_targets(self, model: nn.Module, out_dir) -> list[tuple[Any, str, nn.Module]]:
        """Both exports with the auto class that loads each and the training module whose logits it reproduces."""
        from pretrain.hf_io import unwrap

        model, out_dir = unwrap(model), Path(out_dir)
        return [
            (out_dir / "discriminator",
             "AutoModelForPreTraining" if is_electra(model.discriminator) else "AutoModelForTokenClassification",
             model.discriminator),
            (out_dir / "generator", "AutoModelForMaskedLM", model.generator),
        ]

    # ---------------------------------------------------------------- split protocol (``objectives.base``)
    carry = {"replaced": torch.uint8}

    def encoders(self, model: ElectraPretrainingModel) -> list[nn.Module]:
        if is_electra(model.discriminator):
            return [model.generator.electra, model.discriminator.electra]
        return [stack for network in (model.generator, model.discriminator)
                for stack in backbone_of(network).fused_stacks(network)]

    def split_config(self, model: ElectraPretrainingModel):
        return model.discriminator.config

    def layers(self, model: ElectraPretrainingModel) -> list[nn.Module]:
        if is_electra(model.discriminator):
            return list(model.discriminator.electra.encoder.layer)
        return backbone_of(model.discriminator).layers(model.discriminator)

    def layer_runner(self, model: ElectraPretrainingModel) -> LayerRunner:
        if is_electra(model.discriminator):
            return LayerRunner(model.discriminator.config)
        return backbone_of(model.discriminator).runner(model.discriminator)

    def stem(self, model: ElectraPretrainingModel) -> nn.Module:
        return ElectraStem(model, self)

    def final_head(self, model: ElectraPretrainingModel) -> nn.Module:
        disc = model.discriminator
        predictions = (disc.discriminator_predictions if is_electra(disc)
                       else ReplacedLogit(backbone_of(disc).token_classifier(disc)))
        return FinalRTDHead(predictions, self.config.disc_weight)

    def aux_head(self, config, extra_layer: bool) -> nn.Module:
        head = LocalRTDHead if config.model_type == "electra" else LocalTokenRTDHead
        return head(config, extra_layer, self.config.disc_weight)
