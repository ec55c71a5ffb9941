"""Every script in scripts/ runs by its path in a fresh process (nothing shadows the ``pretrain`` package, no
``sys.path`` edits), and ``scripts/export.py`` exports a tiny run that ``scripts/pretrain.py`` trained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import toy_corpus, write_tiny_config

ROOT = Path(__file__).parent.parent
#: scripts/pretrain.py is a directory holding __main__.py (see there why)
SCRIPTS = sorted(p for p in (ROOT / "scripts").iterdir() if p.suffix == ".py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def run_script(script: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def test_scripts_are_all_found():
    names = {p.name for p in SCRIPTS}
    assert {"pretrain.py", "export.py", "evaluate.py", "compare_objectives.py", "compare_archs.py",
            "demo_check.py"} <= names
    assert (ROOT / "scripts" / "pretrain.py" / "__main__.py").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_help_exits_0(script):
    proc = run_script(script, "--help", timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]


def test_no_script_edits_sys_path():
    for script in [*SCRIPTS, ROOT / "scripts" / "pretrain.py" / "__main__.py"]:
        if script.is_file() and script.name != "benchmark.py":  # benchmark.py: another change removes its edit
            assert "sys.path" not in script.read_text(), script


def test_export_script_exports_a_tiny_run(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(toy_corpus(n_docs=120, seed=2)) + "\n")
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "corpus", tmp_path / "cache", max_steps=2)
    proc = run_script(ROOT / "scripts" / "pretrain.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(ROOT / "scripts" / "export.py", tmp_path / "run", "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported to" in proc.stdout and (tmp_path / "again" / "model.safetensors").is_file()
    proc = run_script(ROOT / "scripts" / "demo_check.py", tmp_path / "run", "--blocks", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert set(summary["probe_ranks"]) == {"israel", "lord", "moses", "list", "plants"}
    assert summary["before"]["median_rank"] >= 1 and 0 <= summary["after"]["top10"] <= 1
    assert "not one token of this vocabulary" in proc.stdout  # the toy vocabulary has none of the probe words


def test_true_token_ranks_and_probes():
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from helpers import make_tokenizer
    from pretrain.studies.demo_check import probe, true_token_ranks

    logits = torch.tensor([[0.1, 3.0, -1.0, 3.0], [5.0, 0.0, 1.0, 2.0]])
    assert true_token_ranks(logits, torch.tensor([1, 0])).tolist() == [1, 1]  # a tie with another token is rank 1
    assert true_token_ranks(logits, torch.tensor([2, 1])).tolist() == [4, 4]
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    result = probe({"m": model}, tok, "the quick brown [MASK] jumps", "fox")
    fox = tok.convert_tokens_to_ids("fox")
    enc = tok("the quick brown [MASK] jumps", return_tensors="pt")
    with torch.no_grad():
        row = model(**enc).logits[0, 4]
    assert result["rank"]["m"] == int((row > row[fox]).sum()) + 1 and len(result["top"]) == 3
