"""SpanBERT (Joshi et al., 2020): geometric word-span masking and the span-boundary objective (SBO).

Masking (``collate``, CPU, one seeded generator per sample) follows §3.1 of the paper and the authors' reference
(facebookresearch/SpanBERT, ``pretraining/fairseq/data/masking.py``, scheme ``pair_span``):

* budget: exactly ``ceil(mask_ratio * n)`` tokens, n = non-special tokens of the block;
* repeat until the budget is spent: draw a span length in **words** ℓ ~ Geometric(p) truncated to
  ``1..max_span_words`` by renormalising (P(ℓ) ∝ (1-p)^(ℓ-1): mean 3.8 for p = 0.2, where ``min(ℓ, 10)`` would give
  ≈4.5), then a start word uniformly among the word starts where ℓ whole words fit; the last span is cut at the budget
  (so it may end inside a word) to make the count exact;
* one replacement decision per span: all [MASK] / all random tokens / unchanged (``--replacement-method span``).

Two deliberate differences from the reference, both so that every sampled span keeps its sampled length:

* The reference draws an anchor token uniformly, snaps it to its word start, and lets spans run into already
  masked words or past the block end; then it merges overlapping *and touching* spans (``merge_intervals``) into
  one span with one decision and one pair of boundaries. We place a span only where its ℓ words are free, and keep
  one unmasked word between spans, so spans never overlap, never touch, and each maximal masked run is exactly one
  sampled span. Only when no free word is left (tiny or fragmented blocks) is the gap rule dropped; touching spans
  are then merged like the reference does.
* The start is uniform over the word starts where the span fits (the reference: ∝ word length in pieces, and a
  span that reaches the block end is shortened). If no free run of ``max_span_words`` words is left, ℓ is drawn from
  the law truncated to the longest free run (never happens in long blocks at a 15% budget).

SBO (§3.2): each masked token x_i of a span (s, e) is predicted from [h_{s-1}; h_{e+1}; p_{i-s+1}] by
Linear → GeLU → LayerNorm → Linear → GeLU → LayerNorm → the input-embedding matrix (tied, read from the encoder at
forward time) + an own bias. As in the reference (``endpoints external``; masking runs on the block without [CLS] /
[SEP], and a span that touches either end gets no pair target), a boundary must be a non-special token of the block:
a span next to [CLS], [SEP] (also a document-separating [SEP] inside a packed block) or [PAD] gets no SBO term, nor do
tokens at relative position >= ``sbo_max_positions`` (the reference truncates pair targets to 15).

Batch layout (per token, [B, L], like ``labels``): ``sbo_left`` / ``sbo_right`` = index of the token just left of /
right of the token's span (s-1, e+1), ``sbo_pos`` = i - s (0-based row of the position embedding, the paper's
p_{i-s+1}); all three are -1 where the token has no SBO term (unmasked, no valid boundary, position too large, or
padding). The SBO target is ``labels`` at the same position.

Split protocol: MLM's (``objectives.mlm``), with :class:`FinalSpanHead` on the last chunk; with K > 1 its SBO head
reads the untied decoder matrix (a copy of the input embeddings at the start) instead of the input embeddings.

Evaluation masks (``span_infilling_spans``, used by ``pretrain.evaluation``) are a separate, simpler scheme: whole
spans of 3-6 words (uniform), several disjoint spans per block.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .backbones import backbone_of
from .base import IGNORE_INDEX, Objective, build_options, encoder_attention_mask
from .mlm import FinalMLMHead, MLMObjective

#: file written next to the Hugging Face export
SBO_HEAD_FILE = "sbo_head.safetensors"


@dataclass
class SpanConfig:
    mask_ratio: float = 0.15
    """Masking budget: exactly ceil(mask_ratio * n) tokens per block (n = non-special tokens)."""
    geometric_p: float = 0.2
    """Span length in words ~ Geometric(p), truncated to [1, max_span_words] and renormalised."""
    max_span_words: int = 10
    """Longest span in words (the paper's 10; mean length 3.8 words with p = 0.2)."""
    mask_token_prob: float = 0.8
    """Per span: probability that all its tokens become [MASK]."""
    random_token_prob: float = 0.1
    """Per span: probability that all its tokens become random tokens (the rest keep the span unchanged)."""
    unigram_random: bool = True
    """Draw random tokens from the corpus unigram distribution when the trainer provides it (else uniform)."""
    sbo_weight: float = 1.0
    """Loss = MLM mean + sbo_weight * SBO mean."""
    sbo_position_dim: int = 200
    """Size of the SBO relative-position embedding (the reference uses 200)."""
    sbo_max_positions: int = 15
    """Number of relative positions the SBO head can embed (>= the longest span in tokens it scores)."""

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.span.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 < self.geometric_p <= 1.0:
            raise ValueError(f"objective.span.geometric_p must be in (0, 1], got {self.geometric_p}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                "objective.span.mask_token_prob and random_token_prob must be >= 0 and sum to at most 1, got "
                f"{self.mask_token_prob} + {self.random_token_prob}"
            )
        for name in ("max_span_words", "sbo_position_dim", "sbo_max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"objective.span.{name} must be >= 1, got {getattr(self, name)}")
        if self.sbo_weight < 0:
            raise ValueError(f"objective.span.sbo_weight must be >= 0, got {self.sbo_weight}")

    def span_length_probs(self) -> np.ndarray:
        """P(ℓ) for ℓ = 1..max_span_words: the geometric law truncated and renormalised (float64)."""
        probs = (1.0 - self.geometric_p) ** np.arange(self.max_span_words, dtype=np.float64)
        return probs / probs.sum()

    def budget(self, n: int) -> int:
        """Masked tokens in a block of n non-special tokens: ceil(mask_ratio * n), immune to 0.15 * 20 = 3.0000000000000004."""
        return math.ceil(round(self.mask_ratio * n, 9))


class SpanDraw(NamedTuple):
    """What ``SpanObjective.draw_spans`` placed in one block (token indices into the block)."""

    masked: np.ndarray
    """[L] bool: the masked tokens (exactly the budget)."""
    spans: list[tuple[int, int]]
    """Token ranges [start, end) in drawing order; only the last one can be cut at the budget."""
    lengths: list[int]
    """Sampled length in words of each span, before any cut at the budget."""
    conditioned: int
    """Draws whose length law had to be truncated to the longest free run (< max_span_words words)."""


class SBOHead(nn.Module):
    """Span-boundary head: [h_{s-1}; h_{e+1}; p_{i-s}] → 2 × (Linear → GeLU → LayerNorm) → tied vocabulary projection.

    The vocabulary matrix is not a parameter of the head: pass the encoder's input embeddings at call time, e.g.
    ``head(left, right, positions, model.get_input_embeddings().weight)`` (that is how it is tied in training, and how
    to tie a head from :func:`load_sbo_head` to a model loaded with ``AutoModelForMaskedLM``). ``bias`` is its own.
    """

    def __init__(self, hidden_size: int, vocab_size: int, position_dim: int = 200, max_positions: int = 15,
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__()
        #: constructor arguments, stored with the export so :func:`load_sbo_head` can rebuild the head
        self.config = dict(hidden_size=hidden_size, vocab_size=vocab_size, position_dim=position_dim,
                           max_positions=max_positions, layer_norm_eps=layer_norm_eps,
                           initializer_range=initializer_range)
        self.position_embeddings = nn.Embedding(max_positions, position_dim)
        self.dense1 = nn.Linear(2 * hidden_size + position_dim, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dense2 = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        # BERT initialisation, as the reference applies to its pair head
        for module in (self.position_embeddings, self.dense1, self.dense2):
            nn.init.normal_(module.weight, std=initializer_range)
        nn.init.zeros_(self.dense1.bias)
        nn.init.zeros_(self.dense2.bias)

    def head_input(self, left: torch.Tensor, right: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[M, 2H + P]: boundary states left/right [M, H] and the embedding of ``positions`` [M] (= i - s)."""
        return torch.cat([left, right, self.position_embeddings(positions).to(left.dtype)], dim=-1)

    def features(self, left: torch.Tensor, right: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.norm1(F.gelu(self.dense1(self.head_input(left, right, positions))))
        return self.norm2(F.gelu(self.dense2(x)))

    def forward(self, left: torch.Tensor, right: torch.Tensor, positions: torch.Tensor,
                embedding_weight: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] for M masked tokens; ``embedding_weight`` [V, H] is the encoder's input embedding matrix."""
        return F.linear(self.features(left, right, positions), embedding_weight, self.bias)

    def predict_span(self, hidden: torch.Tensor, start: int, end: int, embedding_weight: torch.Tensor) -> torch.Tensor:
        """Logits [end - start + 1, V] for the tokens start..end (inclusive) of one sequence's states ``hidden`` [L, H],
        from its boundary states hidden[start - 1] and hidden[end + 1]."""
        m = end - start + 1
        positions = torch.arange(m, device=hidden.device)
        return self(hidden[start - 1].expand(m, -1), hidden[end + 1].expand(m, -1), positions, embedding_weight)


def save_sbo_head(head: SBOHead, path: str | Path) -> None:
    """Write the head's parameters to ``path`` (safetensors) with its constructor arguments in the metadata."""
    from safetensors.torch import save_file

    from pretrain.hf_io import unwrap

    head = unwrap(head)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "sbo_head_config": json.dumps(head.config)})


def load_sbo_head(export_dir: str | Path, map_location: str | torch.device = "cpu") -> SBOHead:
    """Rebuild the SBO head saved by ``SpanObjective.export`` in ``export_dir`` (file ``sbo_head.safetensors``).

    The head carries its own bias but not the vocabulary matrix; tie it to the exported encoder at call time::

        model = AutoModelForMaskedLM.from_pretrained(export_dir)
        head = load_sbo_head(export_dir)
        hidden = model.base_model(input_ids).last_hidden_state[0]                    # [L, H]
        logits = head.predict_span(hidden, s, e, model.get_input_embeddings().weight)  # [e - s + 1, V]
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(export_dir) / SBO_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {export_dir} a SpanBERT export?")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["sbo_head_config"])
    head = SBOHead(**config)
    head.load_state_dict(load_file(str(path), device=str(map_location)))
    return head.to(map_location)


class FinalSpanHead(FinalMLMHead):
    """The last chunk's head: MLM (:class:`~objectives.mlm.FinalMLMHead`) plus the SBO head on the same final
    states, whose vocabulary matrix is the decoder's (= the word embeddings when K = 1, where they are tied)."""

    def __init__(self, final_norm: nn.Module, cls: nn.Module, decoder: nn.Linear, objective: "SpanObjective"):
        super().__init__(final_norm, cls, objective)
        self.decoder = decoder
        self.sbo_head = objective.sbo_head
        self.sbo_inputs = objective.sbo_inputs  # a bound method: plain attribute, not a submodule

    def forward(self, hidden, context, batch, carry):
        hidden = self.final_norm(hidden)
        sums, counts, metrics = self.mlm_parts(hidden, batch)
        left, right, positions, targets = self.sbo_inputs(hidden, batch)
        logits = self.sbo_head(left, right, positions, self.decoder.weight)
        sums["sbo_loss"], sbo_correct = Objective.masked_lm_sums(logits, targets)
        counts["n_sbo"] = (batch["sbo_pos"] >= 0).sum()
        metrics["sbo_acc"] = sbo_correct / counts["n_sbo"].clamp(min=1)
        return sums, counts, metrics


class SpanObjective(MLMObjective):
    """SpanBERT: span masking + MLM + SBO (model: the arch's ``*ForMaskedLM``; the SBO head is ``self.sbo_head``)."""

    name = "span"

    def __init__(self, tokenizer, seed: int = 0, **options: Any):
        Objective.__init__(self, tokenizer, seed)
        self.config = build_options(SpanConfig, options, "objective.span")
        # per instance, because the SBO weight is an option
        self.loss_parts = {"mlm_loss": ("n_masked", 1.0), "sbo_loss": ("n_sbo", self.config.sbo_weight)}
        self.metric_counts = {"mlm_loss": "n_masked", "mlm_acc": "n_masked", "sbo_loss": "n_sbo", "sbo_acc": "n_sbo"}
        self._length_cdf = np.cumsum(self.config.span_length_probs())
        self._length_cdf[-1] = 1.0
        # Plain CPU tensors, not buffers: the masking tables stay on the CPU (DataLoader workers) even when the
        # objective's SBO head is moved to the accelerator.
        vocab = tokenizer.get_vocab()
        prefix = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
        prefix = getattr(prefix, "continuing_subword_prefix", None) or "##"
        #: True for WordPiece continuation pieces ("##ing"): word boundaries when examples carry no word_ids
        self.is_continuation = torch.zeros(self.vocab_size, dtype=torch.bool)
        pieces = [i for t, i in vocab.items() if t.startswith(prefix) and len(t) > len(prefix) and i < self.vocab_size]
        self.is_continuation[pieces] = True
        self._special = self.special_token_mask.numpy().copy()
        self._unigram_cdf: torch.Tensor | None = None
        self.sbo_head: SBOHead | None = None

    # ---------------------------------------------------------------- random replacement tokens
    def set_unigram_counts(self, counts) -> None:
        """Corpus token counts [V] (numpy or tensor); random replacement tokens are then drawn ∝ counts, special
        tokens excluded (if ``unigram_random``). Call before the DataLoader workers are started."""
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64).flatten()
        if len(counts) != self.vocab_size:
            raise ValueError(f"unigram counts have {len(counts)} entries, the vocabulary {self.vocab_size}")
        counts = counts.clamp(min=0)
        counts[torch.from_numpy(self._special)] = 0
        if not counts.sum() > 0:
            raise ValueError("unigram counts put no mass on non-special tokens")
        self._unigram_cdf = torch.cumsum(counts, 0)

    def random_tokens(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self._unigram_cdf is None or not self.config.unigram_random:
            return super().random_tokens(n, gen)  # uniform over the non-special vocabulary
        u = torch.rand(n, generator=gen, dtype=torch.float64) * self._unigram_cdf[-1]
        # right=True skips zero-mass tokens: cdf[i-1] <= u < cdf[i] is impossible when cdf[i-1] == cdf[i]
        return torch.searchsorted(self._unigram_cdf, u, right=True).clamp(max=self.vocab_size - 1)

    # ---------------------------------------------------------------- span placement (CPU, numpy bookkeeping)
    def word_starts(self, ids: np.ndarray, candidates: np.ndarray, word_ids: np.ndarray | None) -> np.ndarray:
        """[L] bool: first piece of each word among the candidate tokens. ``word_ids`` [L] (-1 at specials) come
        from the fast tokenizer; without them a word starts at every piece that is not a ``##`` continuation. A word
        never continues across a non-candidate token (a block start, [SEP] or [UNK])."""
        prev_candidate = np.concatenate([[False], candidates[:-1]])
        if word_ids is None:
            new_word = ~self.is_continuation.numpy()[ids]
        else:
            new_word = (word_ids < 0) | (word_ids != np.concatenate([[-2], word_ids[:-1]]))
        return candidates & (~prev_candidate | new_word)

    def draw_spans(self, candidates: np.ndarray, word_start: np.ndarray, gen: torch.Generator) -> SpanDraw:
        """Place spans over the candidate tokens until exactly ``budget(n)`` are masked (see the module docstring)."""
        length = len(candidates)
        masked = np.zeros(length, dtype=bool)
        budget = self.config.budget(int(candidates.sum()))
        if budget == 0:
            return SpanDraw(masked, [], [], 0)
        starts = np.flatnonzero(word_start)  # first token of each word
        next_start = np.concatenate([word_start[1:], [True]])
        next_candidate = np.concatenate([candidates[1:], [False]])
        ends = np.flatnonzero(candidates & (next_start | ~next_candidate)) + 1  # one past the last token of each word
        n_words = len(starts)
        # words w and w+1 are in the same segment (no special token between them) iff ends[w] == starts[w+1]
        segment = np.concatenate([[0], np.cumsum(ends[:-1] != starts[1:])])
        segment_stop = np.searchsorted(segment, segment, side="right")  # one past the segment's last word
        word_index = np.arange(n_words)
        taken = np.zeros(n_words, dtype=bool)  # words (partly) inside a span
        gap = np.zeros(n_words, dtype=bool)  # words kept unmasked between spans
        keep_gaps = True
        # two uniforms per span (length, start) and at most `budget` spans: one draw keeps the stream reproducible
        uniforms = torch.rand(2 * budget, generator=gen, dtype=torch.float64).numpy()
        spans, lengths, conditioned, total = [], [], 0, 0
        max_words = self.config.max_span_words
        while total < budget:
            available = ~taken & ~gap if keep_gaps else ~taken
            blocked = np.where(available, n_words, word_index)
            next_blocked = np.minimum.accumulate(blocked[::-1])[::-1]
            run = np.minimum(next_blocked, segment_stop) - word_index  # free words from w on, within its segment
            longest = int(run.max())
            if longest == 0:  # only gap words are left (tiny or fragmented blocks): let spans touch
                keep_gaps = False
                continue
            cap = min(longest, max_words)
            conditioned += cap < max_words
            # inverse CDF; scaling u by F(cap) draws from the law truncated to 1..cap (exactly P(ℓ) when cap = max)
            ell = min(int(np.searchsorted(self._length_cdf, uniforms[2 * len(spans)] * self._length_cdf[cap - 1],
                                          side="right")) + 1, cap)
            feasible = np.flatnonzero(run >= ell)
            first = int(feasible[min(int(uniforms[2 * len(spans) + 1] * len(feasible)), len(feasible) - 1)])
            last = first + ell - 1
            begin = int(starts[first])
            end = min(int(ends[last]), begin + budget - total)  # the last span is cut at the budget
            masked[begin:end] = True
            total += end - begin
            taken[first:last + 1] = True
            if first > 0 and segment[first - 1] == segment[first]:
                gap[first - 1] = True
            if last + 1 < n_words and segment[last + 1] == segment[last]:
                gap[last + 1] = True
            spans.append((begin, end))
            lengths.append(ell)
        return SpanDraw(masked, spans, lengths, conditioned)

    # ---------------------------------------------------------------- masking (CPU, DataLoader workers)
    def mask_example(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        ids_np = ids.numpy()
        candidates = ~self._special[ids_np]
        words = None if example.get("word_ids") is None else self._word_ids(example, len(ids)).numpy()
        gen = self._generator(example)
        draw = self.draw_spans(candidates, self.word_starts(ids_np, candidates, words), gen)
        masked = draw.masked
        none = np.full(len(ids), -1, dtype=np.int64)
        if not masked.any():  # a block without non-special tokens
            labels = torch.full_like(ids, IGNORE_INDEX)
            return {"input_ids": ids.clone(), "labels": labels, "sbo_left": torch.from_numpy(none),
                    "sbo_right": torch.from_numpy(none.copy()), "sbo_pos": torch.from_numpy(none.copy())}
        # spans = maximal masked runs (equal to the drawn spans unless a tiny block forced touching spans, which are
        # then merged as in the reference's merge_intervals)
        before = np.concatenate([[False], masked[:-1]])
        after = np.concatenate([masked[1:], [False]])
        run_start = np.flatnonzero(masked & ~before)
        run_end = np.flatnonzero(masked & ~after)  # inclusive
        span_of = np.maximum(np.cumsum(masked & ~before) - 1, 0)  # span index (meaningful at masked positions)
        selected = torch.from_numpy(masked)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        out_ids = self.replace(ids, selected, gen, groups=torch.from_numpy(span_of))
        # SBO: boundaries s-1 and e+1 must be non-special tokens of the block
        left = run_start - 1
        right = run_end + 1
        has_sbo = (left >= 0) & (right < len(ids))
        has_sbo[has_sbo] &= candidates[left[has_sbo]] & candidates[right[has_sbo]]
        position = np.arange(len(ids)) - run_start[span_of]
        valid = masked & has_sbo[span_of] & (position < self.config.sbo_max_positions)
        return {
            "input_ids": out_ids,
            "labels": labels,
            "sbo_left": torch.from_numpy(np.where(valid, left[span_of], none)),
            "sbo_right": torch.from_numpy(np.where(valid, right[span_of], none)),
            "sbo_pos": torch.from_numpy(np.where(valid, position, none)),
        }

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """examples: dicts with ``input_ids`` [L], ``word_ids`` [L] (-1/None at specials; optional: derived from
        ``##`` pieces when absent) and optional ``index``. Returns [B, L] ``input_ids``, ``labels`` (original id where
        predicted, -100 elsewhere), ``attention_mask`` and ``sbo_left`` / ``sbo_right`` / ``sbo_pos`` (-1 where a
        token has no SBO term; see the module docstring)."""
        batch = self.pad_and_stack([self.mask_example(e) for e in examples])
        padding = batch["attention_mask"] == 0
        for key in ("sbo_left", "sbo_right", "sbo_pos"):
            batch[key].masked_fill_(padding, -1)
        return batch

    # ---------------------------------------------------------------- loss
    def counts(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"n_masked": (batch["labels"] != IGNORE_INDEX).sum(), "n_sbo": (batch["sbo_pos"] >= 0).sum()}

    def max_selected(self, block_len: int) -> int:
        """The masking budget of a full block, ceil(mask_ratio * L): no block masks more (SBO tokens are a subset)."""
        return self.config.budget(block_len)

    def sbo_inputs(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        """Gather the M tokens with an SBO term: left/right boundary states [M, H], positions [M], targets [M]
        (IGNORE_INDEX on the padding rows of ``static_shapes``; their positions are clamped to 0)."""
        index, valid = self.gather_index(batch["sbo_pos"] >= 0)
        length = hidden.shape[1]
        rows = index // length
        left = hidden[rows, batch["sbo_left"].flatten()[index].clamp(min=0)]
        right = hidden[rows, batch["sbo_right"].flatten()[index].clamp(min=0)]
        positions = batch["sbo_pos"].flatten()[index].clamp(min=0)
        return left, right, positions, self.gather_targets(batch["labels"], index, valid)

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor], normalizers=None) -> dict:
        """model: the arch's ``*ForMaskedLM``. MLM logits [n_masked, V] and SBO logits [n_sbo, V] are computed only
        at the gathered positions (no [B, L, V] tensor)."""
        if self.sbo_head is None:
            raise RuntimeError("call build_model() first: it creates the SBO head")
        backbone = backbone_of(model)
        mask = encoder_attention_mask(batch)
        hidden = backbone.encoder(model)(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        selected = batch["labels"] != IGNORE_INDEX
        index, valid = self.gather_index(selected)
        mlm_sum, mlm_correct = self.masked_lm_sums(backbone.head(model)(hidden.flatten(0, 1)[index]),
                                                   self.gather_targets(batch["labels"], index, valid))
        left, right, positions, targets = self.sbo_inputs(hidden, batch)
        # the decoder's matrix: the word embeddings (tied), or their untied copy the last chunk of a decoupled run
        # trained (FinalSpanHead), so the stitched model computes what the chunks did (decouple.until_step)
        sbo_logits = self.sbo_head(left, right, positions, backbone.decoder(model).weight)
        sbo_sum, sbo_correct = self.masked_lm_sums(sbo_logits, targets)
        counts = {"n_masked": selected.sum(), "n_sbo": (batch["sbo_pos"] >= 0).sum()}
        extra = {"mlm_acc": mlm_correct / counts["n_masked"].clamp(min=1),
                 "sbo_acc": sbo_correct / counts["n_sbo"].clamp(min=1)}
        return self.reduce({"mlm_loss": mlm_sum, "sbo_loss": sbo_sum}, counts, normalizers, extra)

    def final_head(self, model: nn.Module) -> nn.Module:
        backbone = backbone_of(model)
        return FinalSpanHead(backbone.final_norm(model), backbone.head(model), backbone.decoder(model), self)

    # ---------------------------------------------------------------- model / export
    def build_model(self, model_config) -> nn.Module:
        """The arch's stock ``*ForMaskedLM`` (as MLM); creates ``self.sbo_head`` sized from its config."""
        model = super().build_model(model_config)
        cfg = model.config
        self.sbo_head = SBOHead(cfg.hidden_size, cfg.vocab_size, self.config.sbo_position_dim,
                                self.config.sbo_max_positions, backbone_of(cfg).norm_eps(cfg), cfg.initializer_range)
        return model

    def export(self, model: nn.Module, out_dir, tokenizer) -> None:
        """``out_dir``: the ``*ForMaskedLM`` + tokenizer (``AutoModelForMaskedLM`` loads it) and
        ``sbo_head.safetensors`` (read it with :func:`load_sbo_head`). Both are staged, then moved into place at once."""
        from pretrain.hf_io import replace_dir, save_hf

        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
            staged = Path(tmp) / out_dir.name
            save_hf(model, staged, tokenizer)
            save_sbo_head(self.sbo_head, staged / SBO_HEAD_FILE)
            replace_dir(staged, out_dir)


# --------------------------------------------------------------------------- evaluation masks (pretrain.evaluation)


def word_units(input_ids: np.ndarray, word_ids: np.ndarray, special: np.ndarray) -> list[tuple[int, int, int]]:
    """Words of a block as ``(token_start, token_end, segment)``: maximal runs of non-special tokens sharing a word
    id. ``segment`` counts the special tokens ([CLS], [SEP], [UNK], ...) before the word, so two words with the same
    segment have no special token between them."""
    units, segment, i, length = [], 0, 0, len(input_ids)
    usable = ~special[input_ids] & (word_ids >= 0)
    while i < length:
        if not usable[i]:
            segment += 1
            i += 1
            continue
        j = i + 1
        while j < length and usable[j] and word_ids[j] == word_ids[i]:
            j += 1
        units.append((i, j, segment))
        i = j
    return units


def span_infilling_spans(input_ids, word_ids, special: np.ndarray, rng: np.random.Generator,
                         min_words: int = 3, max_words: int = 6, ratio: float = 0.15) -> list[tuple[int, int, int]]:
    """Disjoint whole-word spans ``(token_start, token_end, n_words)`` for one block, sorted by position.

    Repeat until at least round(ratio · n) tokens are covered (n = non-special tokens; the last span may overshoot)
    or no span fits: draw a length ℓ uniform in [min_words, max_words] words, then a start uniformly among the
    words where ℓ free words follow without a special token in between and neither neighbour word is masked (one
    unmasked word between spans keeps each span a separate unit). If no span of length ℓ fits, ℓ is redrawn among
    the lengths that still fit."""
    ids, words = np.asarray(input_ids), np.asarray(word_ids)
    units = word_units(ids, words, special)
    n_tokens = sum(e - s for s, e, _ in units)
    budget = round(ratio * n_tokens)
    if not units or budget == 0:
        return []
    seg = np.array([u[2] for u in units])
    used = np.zeros(len(units), dtype=bool)

    def starts_for(length: int) -> np.ndarray:
        n = len(units) - length + 1
        if n <= 0:
            return np.zeros(0, dtype=int)
        j = np.arange(n)
        ok = seg[j] == seg[j + length - 1]
        csum = np.concatenate([[0], np.cumsum(used)])
        ok &= csum[j + length] - csum[j] == 0
        left_free = (j == 0) | (seg[np.maximum(j - 1, 0)] != seg[j]) | ~used[np.maximum(j - 1, 0)]
        after = np.minimum(j + length, len(units) - 1)
        right_free = (j + length >= len(units)) | (seg[after] != seg[j]) | ~used[after]
        return j[ok & left_free & right_free]

    spans, covered = [], 0
    lengths = list(range(min_words, max_words + 1))
    while covered < budget:
        length = int(rng.integers(min_words, max_words + 1))
        starts = starts_for(length)
        if len(starts) == 0:
            fitting = [ell for ell in lengths if len(starts_for(ell))]
            if not fitting:
                break
            length = int(rng.choice(fitting))
            starts = starts_for(length)
        j = int(rng.choice(starts))
        used[j:j + length] = True
        start, end = units[j][0], units[j + length - 1][1]
        spans.append((start, end, length))
        covered += end - start
    return sorted(spans)
