"""The architecture recipes (configs/roberta-base.yaml, configs/modernbert-base.yaml): their papers' settings, and
their tiny CPU versions train, evaluate and export through the CLI to the stock classes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import toy_corpus
from pretrain.config import load_config

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def global_batch(cfg) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum


def test_roberta_base_follows_liu_et_al_2019():
    """Table 9 (base): 8k sequences of 512, 500k steps, peak lr 6e-4 after 24k warmup steps, linear decay, Adam
    beta2 0.98 / eps 1e-6, weight decay 0.01, dropout 0.1, no clipping; MLM at 15% with 80/10/10, no NSP."""
    cfg = load_config(ROOT / "configs" / "roberta-base.yaml")
    m, t = cfg.model, cfg.train
    assert (m.arch, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size) == ("roberta", 768, 12, 12, 3072)
    assert cfg.data.block_size == m.max_position_embeddings == 512 and global_batch(cfg) == 8192
    assert (t.max_steps, t.lr, t.warmup_steps, t.schedule) == (500_000, 6e-4, 24_000, "linear")
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.clip_grad_norm) == (0.9, 0.98, 1e-6, 0.01, 0.0)
    assert (m.hidden_dropout, m.attention_dropout) == (0.1, 0.1)
    mlm = cfg.objective.mlm
    assert (cfg.objective.name, mlm.mask_ratio, mlm.mask_token_prob, mlm.random_token_prob) == ("mlm", 0.15, 0.8, 0.1)


def test_modernbert_base_follows_warner_et_al_2024():
    """The reference pretraining configuration: 22 layers x 768, 12 heads, GeGLU 1152, global attention every third
    layer, local window 128, seq 1024, 30% masking, batch 4608, lr 8e-4 constant after a 3B-token warmup, betas
    (0.9, 0.98), eps 1e-6, weight decay 1e-5, no dropout, and 1.719T tokens."""
    cfg = load_config(ROOT / "configs" / "modernbert-base.yaml")
    m, a, t = cfg.model, cfg.model.modernbert, cfg.train
    assert (m.arch, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size) == ("modernbert", 768, 22, 12,
                                                                                         1152)
    assert (a.global_attn_every_n_layers, a.local_attention, a.norm_eps) == (3, 128, 1e-5)
    assert cfg.data.block_size == 1024 and cfg.objective.mlm.mask_ratio == 0.3 and global_batch(cfg) == 4608
    tokens_per_step = global_batch(cfg) * cfg.data.block_size
    assert t.warmup_steps == round(3e9 / tokens_per_step) and t.max_steps == round(1.719e12 / tokens_per_step)
    assert (t.lr, t.schedule, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay) == (8e-4, "constant", 0.9, 0.98,
                                                                                         1e-6, 1e-5)
    assert (m.hidden_dropout, m.attention_dropout) == (0.0, 0.0)


@pytest.mark.parametrize("recipe, arch, stock", [("roberta-tiny", "roberta", "RobertaForMaskedLM"),
                                                 ("modernbert-tiny", "modernbert", "ModernBertForMaskedLM")])
def test_tiny_recipe_trains_and_exports_the_stock_class(recipe, arch, stock, tmp_path):
    """The recipe itself (its arch, widths, masking and optimizer settings) on a toy corpus for 6 steps: the CLI
    evaluates, checkpoints and exports, and checks the export in a fresh process (the run fails otherwise)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(toy_corpus(n_docs=300, seed=3)) + "\n")
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "data.demo=[]", f"data.files=[{corpus}/*.txt]", f"data.cache_dir={tmp_path}/c",
                 "data.validation_fraction=0.1", "tokenizer.vocab_size=200", "train.max_steps=6",
                 "train.micro_batch_size=4", "train.eval_every=3", "train.eval_batches=1", "train.save_every=6",
                 "train.log_every=1", "train.device=cpu", "log.tensorboard=false"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"),
                           str(ROOT / "configs" / f"{recipe}.yaml"), *overrides],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["model_type"] == arch and exported["architectures"] == [stock]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3, 6]
