"""Continued pretraining from an export, with elastic weight consolidation (EWC; Kirkpatrick et al. 2017,
"Overcoming catastrophic forgetting in neural networks", PNAS 114(13)).

``train.ewc.source`` (an MLM export of this toolkit) gives the run its tokenizer and its initial weights θ*. With
``train.ewc.lambda`` λ > 0 the run also estimates, once, the diagonal empirical Fisher F of the MLM loss on the
source's corpus, and every optimizer step adds the gradient of

    penalty(θ) = (λ/2) · Σ_i F_i (θ_i − θ*_i)²

to the new corpus' gradient **once per optimizer step**: after the window's micro-batches are accumulated and
all-reduced, every process adds the same λ·F·(θ − θ*) to ``.grad``, so neither grad_accum nor the world size scales
it (adding it to each micro-batch's loss would count it grad_accum times). It is clipped with the rest.

Fisher estimator: the per-sample empirical Fisher, F_i = (1/N) Σ_b (∂ℓ_b/∂θ_i)², where ℓ_b is the mean masked-token
cross-entropy of ONE block b (the training loss's per-token scale; masks seeded per block, dropout off) and N =
fisher_batches × micro_batch_size blocks of the source corpus' training split. This is the faithful version. The
cheaper per-micro-batch estimate squares the mean gradient of B blocks: E[ḡ²] = (E g)² + Var(g)/B, and at θ*
(a minimum of the source loss) E g ≈ 0, so that estimate shrinks about B-fold and λ's meaning would change with the
batch size. The per-sample loop costs N single-block forward/backward passes, once per run (a few seconds for the
tiny CPU models; negligible next to training on a GPU).

F and θ* are saved to ``OUTPUT_DIR/ewc.safetensors`` (a restarted run reads them instead of re-estimating), and
every checkpoint carries them (``custom_checkpoint_0.pkl``: tensors only, read back with ``weights_only=True`` by
:mod:`pretrain.checkpoint`), so a resume restores exactly what was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

EWC_FILE = "ewc.safetensors"
#: our model.* key -> the key of the export's transformers config.json
ARCHITECTURE_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                     "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
                     "max_position_embeddings": "max_position_embeddings", "vocab_size": "vocab_size"}


class SourceError(ValueError):
    """``train.ewc.source`` cannot be continued from as configured; the message names the fix."""


# --------------------------------------------------------------------------- the source export


def resolve_source(cfg):
    """Check ``train.ewc`` against its source before anything is written, and return ``cfg`` resolved: the source
    as an absolute path, ``tokenizer.path`` = the source, and (for λ > 0) ``fisher_data``/``fisher_seed`` filled
    from the source's ``pretrain_config.yaml`` when left empty. All problems are raised at once as a SourceError."""
    e = cfg.train.ewc
    if not e.source:
        return cfg
    src = Path(e.source).expanduser().resolve()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (src / f).is_file()]
    if missing:
        raise SourceError(f"train.ewc.source '{e.source}' is not an MLM export of this toolkit ({src} has no "
                          f"{', '.join(missing)}); point it at a run's export directory, e.g. runs/tiny/export")
    hf = json.loads((src / "config.json").read_text())
    problems = []
    if hf.get("model_type") != "bert" or not any(a.endswith("ForMaskedLM") for a in hf.get("architectures") or []):
        problems.append(f"the source is a {hf.get('architectures')} ({hf.get('model_type')}) export; continued "
                        "pretraining needs a BertForMaskedLM export (objective mlm)")
    if cfg.model.arch != "bert":
        problems.append(f"model.arch is {cfg.model.arch}: continued pretraining supports bert only")
    if cfg.objective.name != "mlm":
        problems.append(f"objective.name is {cfg.objective.name}: continued pretraining supports mlm only")
    if cfg.decouple.mode != "none":
        problems.append(f"decouple.mode is {cfg.decouple.mode}: continued pretraining needs decouple.mode none")
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).expanduser().resolve() != src:
        problems.append(f"tokenizer.path is {cfg.tokenizer.path} but the model continues with the source's "
                        f"tokenizer: set tokenizer.path: null (or {src})")
    fixes = []
    for ours, theirs in ARCHITECTURE_KEYS.items():
        value = getattr(cfg.model, ours)
        if value != hf.get(theirs) and not (ours == "vocab_size" and value is None):  # null = the tokenizer's size
            fixes.append(f"model.{ours}: {hf.get(theirs)}")
    if fixes:
        problems.append("model.* differs from the source's architecture: set " + ", ".join(fixes))
    fisher_data, fisher_seed = e.fisher_data, e.fisher_seed
    if e.lam > 0:
        fisher_data, fisher_seed = _fisher_corpus(e, src, cfg.train.seed, problems)
        if fisher_data is not None and fisher_data.block_size > cfg.model.max_position_embeddings:
            problems.append(f"train.ewc.fisher_data.block_size ({fisher_data.block_size}) exceeds "
                            f"model.max_position_embeddings ({cfg.model.max_position_embeddings})")
    if problems:
        raise SourceError(f"cannot continue from train.ewc.source {src}:\n  - " + "\n  - ".join(problems))
    ewc = dataclasses.replace(e, source=str(src), fisher_data=fisher_data, fisher_seed=fisher_seed)
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(src)),
                               train=dataclasses.replace(cfg.train, ewc=ewc))


def _fisher_corpus(e, src: Path, seed: int, problems: list[str]):
    """(fisher_data, fisher_seed): as configured, or the data section / train.seed of the source's run config."""
    from .config import ConfigError, load_config

    has_corpus = bool(e.fisher_data.demo or e.fisher_data.files or e.fisher_data.dataset)
    source_cfg = None
    if not has_corpus or e.fisher_seed is None:
        path = src / "pretrain_config.yaml"
        try:
            source_cfg = load_config(path) if path.is_file() else None
        except ConfigError as err:
            problems.append(f"cannot read the source's {path}: {err}")
    if not has_corpus and source_cfg is None:
        problems.append(f"train.ewc.fisher_data is empty and {src} has no readable pretrain_config.yaml: set "
                        "train.ewc.fisher_data to the source's training corpus (e.g. {demo: [bible]})")
        return None, e.fisher_seed
    fisher_data = e.fisher_data if has_corpus else source_cfg.data
    fisher_seed = e.fisher_seed
    if fisher_seed is None:
        fisher_seed = source_cfg.train.seed if source_cfg is not None else seed
    return fisher_data, fisher_seed


def load_source_weights(model: nn.Module, source: str | Path) -> None:
    """Copy the export's weights into ``model`` (a BertForMaskedLM of the same architecture; every key must match)."""
    from transformers import AutoModelForMaskedLM

    exported = AutoModelForMaskedLM.from_pretrained(str(source))
    model.load_state_dict(exported.state_dict(), strict=True)


# --------------------------------------------------------------------------- Fisher and penalty


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """Named trainable parameters; a tied parameter (MLM decoder = word embeddings) appears once."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def estimate_fisher(module: nn.Module, collate, examples: Iterable[dict], counts, device=None) -> tuple[dict, int]:
    """Per-sample empirical Fisher diagonal of ``module``'s loss: ``F[name]`` (shape of the parameter) =
    mean over the examples of (∂ℓ_b/∂θ)², ℓ_b = ``module(collate([example]))["loss"]`` (the objective's token mean
    over one block). Blocks without targets (``counts`` of the collated block all zero) are skipped. Evaluated in
    eval mode (no dropout); parameters and their ``.grad`` are left untouched. Returns (F, number of blocks used)."""
    from .data.stream import to_device

    params = trainable(module)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = module.training
    module.eval()
    used = 0
    for example in examples:
        batch = collate([example])
        if sum(int(c) for c in counts(batch).values()) == 0:
            continue
        loss = module(to_device(batch, device) if device is not None else batch)["loss"]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for f, g in zip(fisher.values(), grads):
            if g is not None:
                f.add_(g.detach().float().square())
        used += 1
    module.train(was_training)
    if used == 0:
        raise ValueError("no Fisher sample has a prediction target: raise train.ewc.fisher_batches")
    return {n: f / used for n, f in fisher.items()}, used


class EWCPenalty:
    """(λ/2) · Σ_i F_i (θ_i − θ*_i)² over named parameters. ``fisher`` and ``theta_star`` map parameter names (as in
    ``trainable(module)``) to tensors of the parameters' shapes. ``state_dict``/``load_state_dict`` (tensors only)
    let every checkpoint carry it (``pretrain.checkpoint.save_checkpoint``'s extras)."""

    def __init__(self, lam: float, fisher: dict[str, torch.Tensor], theta_star: dict[str, torch.Tensor]):
        if fisher.keys() != theta_star.keys():
            raise ValueError("fisher and theta_star must name the same parameters")
        self.lam, self.fisher, self.theta_star = lam, fisher, theta_star

    def _pairs(self, module: nn.Module):
        params = trainable(module)
        if params.keys() != self.fisher.keys():
            raise ValueError(f"EWC state names {len(self.fisher)} parameters, the model has {len(params)} others: "
                             "it belongs to another model")
        for name, p in params.items():
            yield p, self.fisher[name].to(p.device), self.theta_star[name].to(p.device)

    def value(self, module: nn.Module) -> torch.Tensor:
        """The penalty at the module's parameters (differentiable scalar)."""
        return 0.5 * self.lam * sum((f * (p - t).square()).sum() for p, f, t in self._pairs(module))

    @torch.no_grad()
    def add_gradient(self, module: nn.Module) -> torch.Tensor:
        """Add ∂penalty/∂θ = λ·F·(θ − θ*) to every parameter's ``.grad`` (creating it where None); returns the
        penalty at θ, detached. Call once per optimizer step."""
        total = None
        for p, f, t in self._pairs(module):
            diff = p.float() - t
            grad = (self.lam * f * diff).to(p.dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
            term = (f * diff.square()).sum()
            total = term if total is None else total + term
        return 0.5 * self.lam * total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher/{n}": v for n, v in self.fisher.items()},
                **{f"theta_star/{n}": v for n, v in self.theta_star.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.state_dict().keys():
            raise ValueError("the checkpoint's EWC state names other parameters than this run's")
        for key, value in state.items():
            kind, name = key.split("/", 1)
            getattr(self, kind)[name] = value.to(getattr(self, kind)[name].device)

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, lam: float) -> "EWCPenalty":
        from safetensors.torch import load_file

        state = load_file(str(path))
        parts: dict[str, dict] = {"fisher": {}, "theta_star": {}}
        for key, value in state.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = value
        return cls(lam, parts["fisher"], parts["theta_star"])


# --------------------------------------------------------------------------- trainer hook


def fisher_examples(cfg, n: int) -> list[dict]:
    """The first ``n`` blocks of the Fisher corpus' training split in the seeded stream order of ``fisher_seed``
    (each with its stream ``index``, which seeds its masks)."""
    from .data import prepare_blocks
    from .data.stream import StreamDataset

    e = cfg.train.ewc
    fisher_cfg = dataclasses.replace(cfg, data=e.fisher_data, train=dataclasses.replace(cfg.train, seed=e.fisher_seed))
    blocks = prepare_blocks(fisher_cfg).train
    stream = StreamDataset(blocks, e.fisher_seed)
    return [stream[i] for i in range(n)]


def prepare_continued(cfg, module: nn.Module, tokenizer, out: Path, accelerator) -> EWCPenalty | None:
    """Initialise ``module.model`` from the (resolved) source; for λ > 0 return the penalty. F and θ* come from
    ``OUTPUT_DIR/ewc.safetensors`` when an earlier start of this run wrote it, else they are estimated (the main
    process first, which saves them; the others then read the file)."""
    e = cfg.train.ewc
    if not e.source:
        return None
    load_source_weights(module.model, e.source)
    if e.lam == 0:
        return None
    path = Path(out) / EWC_FILE
    with accelerator.main_process_first():
        if path.is_file():
            accelerator.print(f"EWC: reusing the Fisher and θ* of {path}")
            return EWCPenalty.load(path, e.lam)
        start = time.perf_counter()
        examples = fisher_examples(cfg, e.fisher_batches * cfg.train.micro_batch_size)
        collator = cfg.objective.build(tokenizer, e.fisher_seed)
        module.to(accelerator.device)
        fisher, used = estimate_fisher(module, collator.collate, examples, collator.counts, accelerator.device)
        theta_star = {n: p.detach().float().clone() for n, p in trainable(module).items()}
        penalty = EWCPenalty(e.lam, fisher, theta_star)
        accelerator.print(f"EWC: per-sample Fisher of {used} source-corpus blocks in {time.perf_counter() - start:.1f}s"
                          f" (sum F = {sum(float(f.sum()) for f in fisher.values()):.4g})")
        if accelerator.is_main_process:
            penalty.save(path, {"source": e.source, "blocks": str(used), "estimator": "per-sample empirical Fisher"})
    return penalty


__all__ = ["EWCPenalty", "EWC_FILE", "SourceError", "estimate_fisher", "fisher_examples", "load_source_weights",
           "prepare_continued", "resolve_source", "trainable"]
