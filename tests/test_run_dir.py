"""The run directory's guards: exports readable as the umask allows, one run per output_dir at a time (a lock,
stale ones taken over), and metrics.jsonl / TensorBoard cut back to the resumed step."""

import os
import stat

import pytest

from helpers import make_tokenizer, tiny_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root):
    """{relative path: permission bits} of ``root`` and everything under it."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in paths}


@pytest.mark.parametrize("name", ["mlm", "span", "electra"])
def test_export_has_the_umask_permissions(tmp_path, umask_022, name):
    from objectives import get_objective

    tok = make_tokenizer()
    objective = get_objective(name, tok, seed=0)
    objective.export(objective.build_model(tiny_model_config(vocab_size=len(tok))), tmp_path / "export", tok)
    got = modes(tmp_path / "export")
    assert "model.safetensors" in got or "discriminator/model.safetensors" in got
    dirs = {p for p in got if (tmp_path / "export" / p).is_dir()}
    assert {p: m for p, m in got.items() if p in dirs} == {p: 0o755 for p in dirs}
    assert {p: m for p, m in got.items() if p not in dirs} == {p: 0o644 for p in got if p not in dirs}
