"""Export a run's checkpoint to stock ``transformers`` directories (the same as the end of training)."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def export_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Rebuild the model of a pretraining run, load a checkpoint's weights and export it with the objective's
    ``export`` (the same as the end of training; decoupled runs go to ``pretrain.decouple.export_run``). Returns
    the export directory."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from objectives import get_objective

    from .checkpoint import COMPLETE, latest_checkpoint
    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a pretraining run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.decouple.mode != "none":  # chunked checkpoints: stitched back into one model
        from .decouple import export_run

        return export_run(run_dir, checkpoint, out)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if path is None or not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint to export under {run_dir / 'checkpoints'}")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    objective = get_objective(cfg.objective.name, tokenizer, seed=cfg.train.seed, **cfg.objective.options())
    model = objective.build_model(cfg.model)
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
    out = Path(out) if out else run_dir / "export"
    objective.export(model, out, tokenizer)
    return out
