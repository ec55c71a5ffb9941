"""Exports to stock ``transformers`` directories: the end of every training run (:func:`write_export`) and
``pretrain-export RUN`` on any checkpoint of a run (:func:`export_checkpoint`), for both kinds of run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import load_config, save_config
from .hf_io import roundtrip_check


def write_export(objective, model: nn.Module, export_dir: Path, tokenizer, cfg,
                 sidecars: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None,
                 sample: torch.Tensor | None = None) -> None:
    """Export ``model`` with the objective's ``export``, the resolved config (``pretrain_config.yaml``) and
    ``sidecars`` (file name -> (tensors, metadata): what is not part of the HF weights, e.g. a decoupled run's
    auxiliary heads); with ``sample`` (input ids [B, L]) reload every export in a fresh process and check its
    logits against ``model``'s."""
    from safetensors.torch import save_file

    export_dir = Path(export_dir)
    objective.export(model, export_dir, tokenizer)
    save_config(cfg, export_dir / "pretrain_config.yaml")
    for name, (tensors, metadata) in (sidecars or {}).items():
        save_file(tensors, str(export_dir / name), metadata=metadata)
    if sample is None:
        return
    for path, auto_class, reference in objective.export_targets(model, export_dir):
        check = roundtrip_check(path, auto_class, reference.float().cpu(), sample)
        print(f"exported {path}: reloaded as {check['class']} in a fresh process, "
              f"max |logit difference| {check['max_abs_err']:.2e}", flush=True)


def _load_backprop_checkpoint(cfg, path: Path, tokenizer):
    """The objective and its model with the weights of a backprop run's checkpoint ``path``."""
    objective = cfg.objective.build(tokenizer, cfg.train.seed)
    model = objective.build_model(cfg.model)
    _load_weights(model, objective, path)
    return objective, model


def _load_weights(model: nn.Module, objective: nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` of backprop checkpoint ``path`` (keys ``model.…``, ``objective.…``) in place."""
    from safetensors.torch import load_file

    holder = nn.ModuleDict({"model": model, "objective": objective})
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = holder.load_state_dict(weights, strict=False)
    # a tied tensor (e.g. the MLM decoder = word embeddings) is stored once under one of its names
    tensors = holder.state_dict(keep_vars=True)
    names_by_tensor: dict[int, set[str]] = {}
    for name, tensor in tensors.items():
        names_by_tensor.setdefault(id(tensor), set()).add(name)
    untied_missing = [k for k in missing if not any(n in weights for n in names_by_tensor[id(tensors[k])])]
    if untied_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the run's model: missing {untied_missing}, "
                         f"unexpected {sorted(unexpected)}")


def _no_checkpoint_message(root: Path, wanted: Path | None) -> str:
    """Why ``wanted`` (None: the newest) cannot be exported, naming the complete checkpoints there are."""
    from .checkpoint import COMPLETE, list_checkpoints

    complete = [p.name for _, p in list_checkpoints(root) if (p / COMPLETE).is_file()]
    if wanted is None or not complete:
        return f"no complete checkpoint to export under {root}"
    problem = "is incomplete (no COMPLETE marker)" if wanted.is_dir() else "does not exist"
    return f"checkpoint {wanted} {problem}; complete checkpoints of this run: {', '.join(complete)}"


def export_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Rebuild the model of a pretraining run, load a checkpoint's weights (a decoupled run's chunks are stitched
    back into one model) and export it as the end of training does. Returns the export directory."""
    from transformers import AutoTokenizer

    from .checkpoint import COMPLETE, PHASE_KEY, latest_checkpoint, read_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a pretraining run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    out = Path(out) if out else run_dir / "export"
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if path is None or not (path / COMPLETE).is_file():
        raise FileNotFoundError(_no_checkpoint_message(run_dir / "checkpoints", path))
    if cfg.decouple.mode != "none" and read_state(path).get(PHASE_KEY) == "backprop":
        # decouple.until_step: after the switch a checkpoint holds the stitched model (untied as the chunks were)
        from .decouple.run import build_chunked_model

        tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
        chunked, _ = build_chunked_model(cfg, tokenizer)
        _load_weights(chunked.model, chunked.objective, path)
        write_export(chunked.objective, chunked.export_model().float().cpu(), out, tokenizer, cfg)
        return out
    if cfg.decouple.mode != "none":
        from .decouple.run import load_run, sidecar_files

        chunked, tokenizer, cfg = load_run(run_dir, path)
        write_export(chunked.objective, chunked.export_model().float().cpu(), out, tokenizer, cfg,
                     sidecar_files(chunked))
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    objective, model = _load_backprop_checkpoint(cfg, path, tokenizer)
    write_export(objective, model, out, tokenizer, cfg)
    return out
