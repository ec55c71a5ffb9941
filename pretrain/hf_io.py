"""Hugging Face I/O (a leaf: imports nothing of this project): stripping wrappers, atomic ``save_pretrained`` of a
model and its tokenizer, atomic directory replacement, and the fresh-process round trip of an export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` / DDP wrappers so saved keys carry no ``_orig_mod.`` / ``module.`` prefix."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save as ``BertTokenizerFast`` files (tokenizer.json + vocab.txt) so AutoTokenizer loads it offline."""
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast) and not isinstance(tokenizer, BertTokenizerFast):
        tokenizer = BertTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map)
    tokenizer.save_pretrained(str(out_dir))


def save_hf(model: nn.Module, out_dir: str | Path, tokenizer) -> None:
    """Write ``model`` (a ``transformers`` PreTrainedModel) and ``tokenizer`` to ``out_dir`` atomically:
    a temporary sibling directory is filled, then renamed into place (an old export is replaced only then)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model = unwrap(model)
    model.save_pretrained(str(tmp))
    save_tokenizer(tokenizer, tmp)
    config = json.loads((tmp / "config.json").read_text())
    if "auto_map" in config:
        raise RuntimeError("export would need remote code (auto_map in config.json); refusing")
    replace_dir(tmp, out_dir)


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the permissions the umask grants new files and directories (undoes
    ``mkdtemp``'s 0700 and the 0600 of files written through temporary files, so others can read an export)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` only after ``src`` is complete; ``src``
    gets the umask's permissions first (:func:`apply_umask`)."""
    apply_umask(src)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


ROUNDTRIP_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoTokenizer
export_dir, auto_class, ref_path = sys.argv[1:4]
ref = torch.load(ref_path)
tok = AutoTokenizer.from_pretrained(export_dir)
model = getattr(transformers, auto_class).from_pretrained(export_dir).eval()
with torch.no_grad():
    out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
err = (out.float() - ref["logits"].float()).abs().max().item()
print(json.dumps({"class": type(model).__name__, "tokenizer": type(tok).__name__, "fast": tok.is_fast,
                  "vocab": len(tok), "max_abs_err": err}))
"""


def roundtrip_check(
    export_dir: str | Path, auto_class: str, reference: nn.Module, input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None, atol: float = 1e-5,
) -> dict:
    """Load ``export_dir`` with ``transformers.<auto_class>`` in a fresh offline process and compare its fp32 logits
    on ``input_ids`` [B, L] with ``reference`` (the training model). Raises if they differ by more than ``atol``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    reference = unwrap(reference)
    was_training = reference.training
    reference.eval()
    with torch.no_grad():
        logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits.float().cpu()
    reference.train(was_training)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "ref.pt"
        torch.save({"input_ids": input_ids.cpu(), "attention_mask": attention_mask.cpu(), "logits": logits}, ref_path)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-c", ROUNDTRIP_SCRIPT, str(export_dir), auto_class, str(ref_path)],
            capture_output=True, text=True, env=env,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"loading {export_dir} with {auto_class} failed in a fresh process:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["max_abs_err"] <= atol:
        raise RuntimeError(f"export logits differ from the training model by {result['max_abs_err']:.3g} > {atol}")
    return result
