"""A decoupled run's model outside the pipeline: building it, reading chunks back from a checkpoint, and the files
exported beside the stitched model (auxiliary heads, synthetic-gradient modules)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable

import torch

from ..checkpoint import COMPLETE, latest_checkpoint
from ..config import Config, load_config
from .chunks import ChunkedModel
from .synthetic import SYNTHETIC_EXPORT_FILE, SYNTHETIC_FILE

#: file written beside the Hugging Face export with the auxiliary heads of chunks 0..K-2
AUX_HEADS_FILE = "aux_heads.safetensors"


def build_chunked_model(cfg: Config, tokenizer, unigram_counts=None) -> tuple[ChunkedModel, object]:
    """The objective, its model and the auxiliary heads, cut into ``decouple.chunks`` chunks. Call after seeding:
    every process builds the whole model the same way, so a chunk's initial weights do not depend on the runtime.
    Returns ``(chunked_model, collator)`` where the collator is a CPU copy of the objective for the data loaders."""
    objective = cfg.objective.build(tokenizer, cfg.train.seed, unigram_counts)
    model = objective.build_model(cfg.model)
    collator = copy.deepcopy(objective)
    return ChunkedModel(model, objective, cfg.decouple), collator


def load_chunks(model: ChunkedModel, path: Path, chunks: Iterable[int]) -> None:
    """Load ``chunks`` of checkpoint ``path`` (``chunk{k}/``: weights, and M_k in synthetic mode) into ``model``."""
    from safetensors.torch import load_file

    for k in chunks:
        model.load_chunk_state_dict(k, load_file(str(path / f"chunk{k}" / "model.safetensors")))
        if k < len(model.synthetic):
            model.synthetic[k].load_state_dict(load_file(str(path / f"chunk{k}" / SYNTHETIC_FILE)))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[ChunkedModel, object, Config]:
    """Rebuild a decoupled run's :class:`ChunkedModel` from ``run_dir`` and load every chunk of a checkpoint
    (default: the newest complete one). Returns ``(model, tokenizer, cfg)``."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if path is None or not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    model, _ = build_chunked_model(cfg, tokenizer)
    load_chunks(model, path, range(model.num_chunks))
    return model, tokenizer, cfg


def sidecar_files(model: ChunkedModel) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """What a decoupled export writes beside the HF weights: file name -> (fp32 CPU tensors, safetensors metadata):
    ``aux_heads.safetensors`` (local mode) and ``synthetic_gradients.safetensors`` (synthetic mode)."""
    files = {}
    meta = {"format": "pt", "layer_ranges": json.dumps(model.ranges), "objective": model.objective.name}
    if len(model.aux):
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.aux_state_dict().items()}
        files[AUX_HEADS_FILE] = (tensors, {**meta, "aux_head": model.aux_head})
    if len(model.synthetic):
        tensors = {f"synthetic.{k}": v.detach().float().cpu().contiguous()
                   for k, v in model.synthetic.state_dict().items()}
        files[SYNTHETIC_EXPORT_FILE] = (tensors, meta)
    return files
