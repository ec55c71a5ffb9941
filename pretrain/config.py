"""Typed configuration: the schema (a dataclass tree) and the functions that load, save and compare it.

``load_config("configs/tiny.yaml", ["train.lr=3e-4"])`` returns a validated :class:`Config`. Every problem in a
file or override (unknown key, with the closest valid key; wrong type; invalid value) is collected and raised once
as a :class:`ConfigError`. ``save_config`` writes the resolved tree back to YAML. The YAML <-> dataclass engine is
``pretrain.config_io``; the option sections of the objectives and decoupling modes come from their registries
(``objectives.OBJECTIVES``, ``pretrain.decouple.modes.DECOUPLING``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import objectives

from . import config_io
from .config_io import ConfigError, HasSections, changed_fields, choice, parse_overrides, sections
from .decouple import modes
from .decouple.ranges import layer_ranges


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _objective_sections() -> dict[str, type]:
    return {name: objectives.options_class(name) for name in objectives.OBJECTIVES}


def _mode_sections() -> dict[str, type | None]:
    return {name: modes.options_class(name) for name in modes.DECOUPLING}


def _arch_sections() -> dict[str, type | None]:
    return {name: backbone.options for name, backbone in objectives.BACKBONES.items()}


@dataclass
class DataConfig:
    demo: list[str] = field(default_factory=list)
    """Parts of the offline demo corpus to use (fetched from Debian packages): bible, pydoc, gcide."""
    files: list[str] = field(default_factory=list)
    """Local corpus files or globs: .txt (one document per line), .json/.jsonl, .csv, .parquet."""
    dataset: str | None = None
    """A `datasets` hub name (read from the local datasets cache when offline)."""
    dataset_config: str | None = None
    """Configuration name of the hub dataset."""
    split: str = "train"
    """Split of the hub dataset / files to read."""
    text_column: str = "text"
    """Column holding the document text."""
    max_documents: int | None = None
    """Keep only the first N documents (quick experiments)."""
    validation_fraction: float = 0.02
    """Fraction of documents held out for validation (split by document, seeded; a corpus of too few documents is
    split by blocks). Training needs it > 0; 0 puts every block in the train split (data preparation only)."""
    block_size: int = 128
    """Tokens per packed block, including [CLS] and the final [SEP]."""
    cache_dir: str = "~/.cache/encoder-pretrain"
    """Where the demo corpus, trained tokenizers and packed blocks are cached (keyed by a hash of their inputs)."""
    num_workers: int = 1
    """DataLoader worker processes that run the objective's masking (0 = in the training process)."""
    num_proc: int | None = None
    """Processes that tokenize the corpus when the blocks are prepared (null = the usable CPU cores, see
    ``processes()``). The blocks are byte-identical for any value, so it is not part of their cache key."""

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.block_size < 8:
            raise ValueError(f"data.block_size must be >= 8, got {self.block_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1 (processes that tokenize the corpus) or null (the usable "
                             f"cores), got {self.num_proc}")
        unknown = sorted(set(self.demo) - {"bible", "pydoc", "gcide", "wordnet"})
        if unknown:
            raise ValueError(f"data.demo has unknown parts {unknown}; choose from bible, pydoc, gcide, wordnet")

    def processes(self) -> int:
        """Tokenizing processes: ``num_proc``, or the usable CPU cores when it is null."""
        return usable_cores() if self.num_proc is None else self.num_proc


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing tokenizer directory (AutoTokenizer.from_pretrained); null = train a WordPiece vocab on the corpus."""
    vocab_size: int = 8192
    """Vocabulary size of a trained WordPiece tokenizer."""
    lowercase: bool = True
    """Lowercase (and strip accents) before WordPiece, as bert-base-uncased."""
    min_frequency: int = 2
    """Minimum pair frequency for WordPiece merges."""

    def __post_init__(self):
        if self.vocab_size < 128:
            raise ValueError(f"tokenizer.vocab_size must be >= 128, got {self.vocab_size}")


@dataclass
class ModelConfig(HasSections):
    arch: str = choice(lambda: objectives.BACKBONES, "bert")
    """Encoder architecture, a name in ``objectives.BACKBONES``: bert (``BertForMaskedLM``), roberta
    (``RobertaForMaskedLM``) or modernbert (``ModernBertForMaskedLM``); the fields below map onto each (README
    "Encoder architectures"), arch-specific ones sit in the section ``model.<arch>``."""
    hidden_size: int = 128
    """Encoder width H."""
    num_layers: int = 4
    """Number of transformer layers."""
    num_heads: int = 2
    """Attention heads (hidden_size must be divisible by it)."""
    intermediate_size: int = 512
    """Feed-forward width (4 x H in BERT)."""
    max_position_embeddings: int = 512
    """Longest sequence the position embeddings cover (data.block_size must not exceed it)."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and sub-layer outputs."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    vocab_size: int | None = None
    """Expected vocabulary size (null = the tokenizer's); a mismatch with the tokenizer is an error."""
    embedding_size: int | None = None
    """ELECTRA only: embedding width (null = hidden_size); an embedding projection maps it to the hidden size."""
    fast: bool | None = None
    """Fast path (pretrain/fast.py): static-shape prediction heads, fused QKV encoders without a mask on unpadded
    blocks, the step's forward torch.compile'd as one graph; same parameters and exports. null = on when
    training on CUDA (torch >= 2.7); decoupled runs apply it per chunk."""
    sections: types.SimpleNamespace = sections(_arch_sections)
    """The arch-specific fields of the archs that have them (``model.modernbert``: local/global attention, RoPE)."""

    def __post_init__(self):
        for name, options in vars(self.sections).items():
            changed = changed_fields(options) if name != self.arch else []
            if changed:
                raise ValueError(f"model.{name}.{changed[0]} is set but model.arch={self.arch}: set "
                                 f"model.arch={name} or remove the model.{name} options")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.num_layers < 1:
            raise ValueError(f"model.num_layers must be >= 1, got {self.num_layers}")


@dataclass
class ObjectiveConfig(HasSections):
    name: str = choice(lambda: objectives.OBJECTIVES, "mlm")
    """Which objective trains the model: a name in ``objectives.OBJECTIVES`` (mlm, span, electra, or registered)."""
    sections: types.SimpleNamespace = sections(_objective_sections)
    """One options section per objective (``objective.mlm``, ``objective.span``, ...), all kept in config.yaml."""

    def options(self) -> dict[str, Any]:
        """The chosen objective's options as keyword arguments for ``get_objective``."""
        return dataclasses.asdict(getattr(self, self.name))

    def build(self, tokenizer, seed: int, unigram_counts=None):
        """The chosen objective for ``tokenizer`` (masking seeded by ``seed``), given the corpus' unigram counts
        when known (SpanBERT's random replacements draw from them)."""
        objective = objectives.get_objective(self.name, tokenizer, seed=seed, **self.options())
        if unigram_counts is not None:
            objective.set_unigram_counts(unigram_counts)
        return objective


@dataclass
class EWCConfig:
    """Continued pretraining from an export, optionally with elastic weight consolidation (Kirkpatrick et al. 2017,
    "Overcoming catastrophic forgetting in neural networks"): the loss gains (lambda/2)·Σ_i F_i (θ_i − θ*_i)², θ* the
    source's weights and F the diagonal empirical Fisher of the MLM loss on the source's corpus (pretrain/ewc.py)."""

    lam: float = field(default=0.0, metadata={"key": "lambda"})
    """YAML key ``lambda``: penalty strength λ (dimensionless; the Fisher is in units of the per-token MLM loss).
    0 = plain continued pretraining from ``source`` (the baseline arm), or an ordinary run when ``source`` is null."""
    source: str | None = None
    """An MLM export of this toolkit (e.g. RUN/export) to start from: its weights initialise the model, its tokenizer
    is used (tokenizer.path must be null or this directory) and model.* must match its architecture."""
    fisher_batches: int = 8
    """Micro-batches of train.micro_batch_size blocks of ``fisher_data``'s training split for the Fisher; every
    block's gradient is squared separately (per-sample empirical Fisher), so this costs fisher_batches x
    micro_batch_size forward/backward passes of one block, once per run."""
    fisher_data: DataConfig = field(default_factory=DataConfig)
    """The ORIGINAL corpus (same forms as ``data``: demo/files/dataset). Empty = the data section of the source's
    pretrain_config.yaml; the run's config.yaml records the resolved corpus."""
    fisher_seed: int | None = None
    """Seed of fisher_data's train/validation split and of its block order and masks (null = the source run's
    train.seed, so the Fisher never sees the source's held-out blocks)."""

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"train.ewc.lambda must be >= 0, got {self.lam}")
        if self.lam > 0 and not self.source:
            raise ValueError("train.ewc.lambda > 0 needs train.ewc.source: the export (e.g. RUN/export) whose weights "
                             "the penalty keeps the model close to")
        if self.fisher_batches < 1:
            raise ValueError(f"train.ewc.fisher_batches must be >= 1, got {self.fisher_batches}")


@dataclass
class ProbeConfig:
    """Linear probes of intermediate representations at every evaluation (off unless ``data`` is set): does each
    layer, or each decoupled chunk, learn the features the layers above need? Texts are encoded as they are (no
    masking), mean-pooled over their tokens, and a logistic regression is fitted per probed layer (``pretrain/probe.py``)."""

    data: str | None = None
    """null (off), ``supersense`` (WordNet glosses -> 45 supersenses, fetched with the demo corpus: DESIGN.md §7) or
    a JSONL file of ``{"text": ..., "label": ...}`` lines."""
    n_train: int = 2000
    """Probe training examples (a fixed seeded split; duplicate texts dropped first)."""
    n_test: int = 1000
    """Probe test examples (disjoint from the training ones)."""
    layers: str | list[int] = "all"
    """Backprop runs: the layer outputs to probe (1 = after the first transformer layer; ``all``). Decoupled runs
    probe each chunk's output, logged under its layer number, so both compare by name (``probe_acc_layer{n}``)."""
    max_iter: int = 300
    """lbfgs iterations of each fit."""
    max_length: int = 64
    """Tokens per text (longer ones are truncated)."""

    def __post_init__(self):
        for name in ("n_train", "n_test", "max_iter", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.probe.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"train.probe.layers must be 'all' or a list of layer numbers, got {self.layers!r}")
        if isinstance(self.layers, list) and (not self.layers or min(self.layers) < 1):
            raise ValueError(f"train.probe.layers must list layer numbers >= 1, got {self.layers}")


@dataclass
class TrainConfig:
    seed: int = 0
    """Seeds model init, data order and masking."""
    micro_batch_size: int = 32
    """Blocks per process per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["linear", "cosine", "constant", "wsd", "onecycle"] = "linear"
    """Decay after warmup: linear to min_lr_ratio x lr, cosine, constant, or wsd (warmup-stable-decay: lr held,
    then linear decay to min_lr_ratio x lr over the last wsd_decay_fraction of max_steps); or onecycle (Smith &
    Topin 2017, as torch's OneCycleLR with cosine annealing): LR lr/onecycle_div_factor -> lr over
    onecycle_pct_start of max_steps, then -> lr/(onecycle_div_factor x onecycle_final_div_factor), with Adam's beta1
    cycled inversely (it replaces adam_beta1; warmup_steps and min_lr_ratio are not used). Find lr with
    scripts/lr_find.py."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps (linear, cosine, constant, wsd)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of lr (linear, cosine and wsd)."""
    wsd_decay_fraction: float = 0.2
    """wsd: fraction of max_steps at the end over which the LR decays (Hagele et al. 2024 find 0.2 matches cosine;
    with decouple.until_step at the decay's start, the end-to-end phase gets the whole decay)."""
    onecycle_pct_start: float = 0.3
    """onecycle: fraction of max_steps spent raising the LR to its peak lr."""
    onecycle_div_factor: float = 25.0
    """onecycle: the LR starts at lr / onecycle_div_factor."""
    onecycle_final_div_factor: float = 1e4
    """onecycle: the LR ends at lr / (onecycle_div_factor x onecycle_final_div_factor)."""
    onecycle_max_momentum: float = 0.95
    """onecycle: Adam beta1 at the start and end of the cycle (where the LR is lowest)."""
    onecycle_base_momentum: float = 0.85
    """onecycle: Adam beta1 at the LR peak."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, applied to matrices only (not to biases or LayerNorm weights)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    clip_grad_norm: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling."""
    eval_every: int = 200
    """Evaluate on the validation split every N steps (0 = only at the end)."""
    eval_batches: int = 20
    """Validation set size in micro-batches: the first eval_batches × micro_batch_size validation blocks (fixed
    masks, token-exact means), shared among the processes, so the metrics do not depend on their number."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older complete ones are removed only after a newer one is complete)."""
    log_every: int = 10
    """Print/log metrics every N steps (the only host syncs for metrics)."""
    device: Literal["auto", "cpu"] = "auto"
    """auto = accelerate's choice (GPU when present); cpu forces the CPU."""
    ewc: EWCConfig = field(default_factory=EWCConfig)
    """Continued pretraining from an export, with or without EWC (off by default)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Linear probes of every layer (backprop) or chunk output (decoupled) at each evaluation (off by default)."""

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "keep_last", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ValueError(f"train.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if not 0.0 < self.onecycle_pct_start < 1.0:
            raise ValueError(f"train.onecycle_pct_start must be in (0, 1), got {self.onecycle_pct_start}")
        for name in ("onecycle_div_factor", "onecycle_final_div_factor"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be >= 1 (the LR is divided by it), got {getattr(self, name)}")
        if not 0.0 <= self.onecycle_base_momentum <= self.onecycle_max_momentum < 1.0:
            raise ValueError("train.onecycle_base_momentum <= train.onecycle_max_momentum must both lie in [0, 1), "
                             f"got {self.onecycle_base_momentum} and {self.onecycle_max_momentum}")


@dataclass
class DecoupleConfig(HasSections):
    mode: str = choice(lambda: modes.DECOUPLING, "none", extra=("none",))
    """none = end-to-end backprop; local = every chunk learns from its own auxiliary loss; synthetic = DNI; or a mode
    registered in ``pretrain.decouple.modes.DECOUPLING``."""
    chunks: int = 1
    """K: number of contiguous chunks the encoder (embeddings + layers) is cut into."""
    boundaries: str | list[int] = "auto"
    """auto (balanced by layer count, embeddings on chunk 0) or the K-1 layer indices where chunks 1..K-1 start."""
    aux_head: Literal["decoder", "layer"] = "decoder"
    """Local auxiliary head of non-final chunks: MLM decoder only, or 1 extra transformer layer + decoder."""
    runtime: Literal["auto", "simulated", "distributed"] = "auto"
    """simulated = all chunks in one process; distributed = one process per chunk, D × K processes for D
    data-parallel pipelines (local mode; rank = dp_index × K + chunk); auto: distributed when the launch has more
    than one process."""
    freeze_lower: bool = False
    """local only, the control arm of DESIGN.md §4: chunks 0..K-2 keep their random initialisation (forward only,
    no updates) and only the last chunk trains, on their frozen features."""
    overlap: int = 0
    """local only: M, the layers shared across each boundary (overlapping local updates, Laskin et al. 2020): the
    top M layers of chunk k (it owns them and their optimizer state) are also trained by chunk k+1's loss, whose
    gradient at chunk k+1's input travels down and is backpropagated through those M layers only, never further.
    0 = disjoint chunks; 0 <= M < the smallest chunk's layer count. Costs chunk k one backward pass of its top M
    layers per micro-batch and one [B, L, H] fp32 message down per boundary; chunk k keeps up to two micro-batches'
    graphs and waits for the window's last gradient before its update (README: "Overlapping local updates")."""
    until_step: int | None = None
    """Local, then backprop (Laskin et al. 2020): train decoupled for optimizer steps 1..N, then the stitched model
    end to end from step N+1 to train.max_steps, in the same loop (README "Local, then backprop"): AdamW moments and
    step counts carry over, auxiliary heads and synthetic-gradient modules are dropped, the LR schedule and the
    global batch continue. null = decoupled to the end. Needs mode local or synthetic and 1 <= N < train.max_steps."""
    sections: types.SimpleNamespace = sections(_mode_sections)
    """Options of the modes that have them (``decouple.synthetic``: synthetic-gradient modules, staleness)."""

    def __post_init__(self):
        if self.chunks < 1:
            raise ValueError(f"decouple.chunks must be >= 1, got {self.chunks}")
        if self.mode == "none" and self.chunks > 1:
            raise ValueError(f"decouple.chunks={self.chunks} needs decouple.mode local or synthetic "
                             "(mode none trains the whole encoder end to end)")
        if self.freeze_lower and (self.mode != "local" or self.chunks < 2):
            raise ValueError("decouple.freeze_lower needs decouple.mode=local and decouple.chunks >= 2 "
                             "(it freezes chunks 0..K-2)")
        if self.overlap < 0:
            raise ValueError(f"decouple.overlap must be >= 0 (layers shared across each boundary), got {self.overlap}")
        if self.overlap and self.mode == "synthetic":
            raise ValueError("decouple.overlap has no meaning with decouple.mode=synthetic (no local loss trains the "
                             "layers below a boundary): set decouple.overlap=0 or decouple.mode=local")
        if self.overlap and (self.mode != "local" or self.chunks < 2):
            raise ValueError(f"decouple.overlap={self.overlap} needs decouple.mode=local and decouple.chunks >= 2 "
                             "(layers shared across a boundary between two local losses)")
        if self.overlap and self.freeze_lower:
            raise ValueError("decouple.overlap trains the lower chunks' top layers with the upper chunk's loss, but "
                             "decouple.freeze_lower freezes them: set one of them off")
        if self.until_step is not None and self.mode == "none":
            raise ValueError("decouple.until_step switches a decoupled run to end-to-end backprop: it needs "
                             "decouple.mode local or synthetic (mode none is backprop throughout); remove until_step")
        if self.until_step is not None and self.until_step < 1:
            raise ValueError(f"decouple.until_step must be >= 1 (the last decoupled step), got {self.until_step}; "
                             "use null for no switch")
        if self.mode == "synthetic" and self.chunks < 2:
            raise ValueError("decouple.mode=synthetic needs decouple.chunks >= 2 (a boundary to predict gradients at)")
        for name, options in vars(self.sections).items():
            changed = changed_fields(options) if name != self.mode else []
            if changed:
                raise ValueError(f"decouple.{name}.{changed[0]} is set but decouple.mode={self.mode}: set "
                                 f"decouple.mode={name} or remove the decouple.{name} options")
        if self.mode == "synthetic" and self.aux_head != "decoder":
            raise ValueError("decouple.aux_head applies to mode local only; synthetic chunks have no auxiliary head")
        if isinstance(self.boundaries, str) and self.boundaries != "auto":
            raise ValueError(f"decouple.boundaries must be 'auto' or a list of layer indices, got {self.boundaries!r}")
        if isinstance(self.boundaries, list):
            if len(self.boundaries) != self.chunks - 1:
                raise ValueError(f"decouple.boundaries needs chunks - 1 = {self.chunks - 1} layer indices, "
                                 f"got {self.boundaries}")
            if sorted(set(self.boundaries)) != self.boundaries or any(b < 1 for b in self.boundaries):
                raise ValueError(f"decouple.boundaries must be strictly increasing layer indices >= 1, "
                                 f"got {self.boundaries}")


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Also write TensorBoard event files to OUTPUT_DIR/tensorboard."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, export/."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decouple: DecoupleConfig = field(default_factory=DecoupleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.data.block_size > self.model.max_position_embeddings:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings}); lower the block size or raise the position count"
            )
        if not trains(self.objective.name, self.model.arch):
            archs = objectives.objective_class(self.objective.name).archs
            others = [name for name in objectives.OBJECTIVES if trains(name, self.model.arch)]
            raise ValueError(f"objective {self.objective.name} trains model.arch {' or '.join(archs)} only, got "
                             f"model.arch={self.model.arch}: set model.arch={archs[0]}, or objective.name "
                             f"{' or '.join(others)}")
        d = self.decouple
        problem = d.mode != "none" and modes.unsupported(objectives.objective_class(self.objective.name), d.mode)
        if problem:  # at config time, before any data is prepared
            raise ValueError(problem)
        if d.chunks > self.model.num_layers:
            raise ValueError(f"decouple.chunks ({d.chunks}) exceeds model.num_layers ({self.model.num_layers}): "
                             "every chunk needs at least one layer")
        if isinstance(d.boundaries, list) and d.boundaries and d.boundaries[-1] >= self.model.num_layers:
            raise ValueError(f"decouple.boundaries {d.boundaries} must be < model.num_layers "
                             f"({self.model.num_layers})")
        if d.overlap and self.train.precision == "fp16":
            raise ValueError("decouple.overlap does not implement fp16 loss scaling of the gradients the chunks "
                             "exchange: use train.precision bf16 or fp32")
        if d.overlap:
            sizes = [stop - start for start, stop in layer_ranges(self.model.num_layers, d.chunks, d.boundaries)]
            if d.overlap >= min(sizes):
                raise ValueError(f"decouple.overlap={d.overlap} must be smaller than the smallest chunk's layer count "
                                 f"(chunks of {sizes} layers): lower decouple.overlap or move decouple.boundaries")
        if d.until_step is not None and d.until_step >= self.train.max_steps:
            raise ValueError(f"decouple.until_step ({d.until_step}) must be < train.max_steps "
                             f"({self.train.max_steps}): the backprop phase trains steps until_step+1..max_steps; "
                             "lower it, or set it to null to stay decoupled")
        if not (self.data.demo or self.data.files or self.data.dataset):
            raise ValueError("no corpus: set data.files (local files), data.dataset (hub name) or data.demo")


def trains(objective: str, arch: str) -> bool:
    """Whether objective ``objective`` trains backbone ``arch`` (``Objective.archs``)."""
    archs = objectives.objective_class(objective).archs
    return archs is None or arch in archs


def config_from_dict(data: dict) -> Config:
    """A validated :class:`Config` from plain data (a parsed YAML tree); raises :class:`ConfigError`."""
    return config_io.build_root(Config, data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    return config_from_dict(config_io.read_tree(path, overrides))


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data under its YAML keys (what ``config_from_dict`` reads back)."""
    return config_io.to_dict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temporary file + rename): the other processes of a launch read it
    while the main one writes it, and must see either no file or a whole one."""
    config_io.write_yaml_atomic(config_to_dict(cfg), path)


#: keys that may change between a run and its resumption (anything else must match the saved config); output_dir
#: is where the run is, not what it is (a moved or copied run resumes)
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                     "train.log_every", "train.eval_batches", "train.probe", "data.num_workers", "data.num_proc",
                     "train.ewc.fisher_data.num_proc", "data.cache_dir", "log.",
                     "decouple.runtime", "model.fast")


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring the keys (and sections) in ``ignore``. A
    key ``old`` lacks counts as its default: a config saved before the key existed ran with it (e.g.
    ``decouple.overlap``)."""
    return config_io.differences(_with_defaults(old, new, Config), new, ignore)


def _with_defaults(old: dict, new: dict, cls: type) -> dict:
    """``old`` plus the plain default of each field (and options section) of dataclass ``cls`` that ``new`` has and
    ``old`` lacks."""
    hints = typing.get_type_hints(cls)
    out = dict(old)
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            for name, options in f.metadata["sections"]().items():
                if options is not None and name in new and name not in old:
                    out[name] = config_to_dict(options())
            continue
        key = f.metadata.get("key", f.name)
        if key not in new:
            continue
        if key not in old and f.default is not dataclasses.MISSING:
            out[key] = f.default
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(old.get(key), dict) and isinstance(new[key], dict):
            out[key] = _with_defaults(old[key], new[key], hints[f.name])
    return out


__all__ = ["RESUMABLE_CHANGES", "Config", "ConfigError", "DataConfig", "DecoupleConfig", "EWCConfig", "LogConfig",
           "ModelConfig", "ObjectiveConfig", "ProbeConfig", "TokenizerConfig", "TrainConfig", "config_differences",
           "config_from_dict", "config_to_dict", "load_config", "parse_overrides", "save_config"]
