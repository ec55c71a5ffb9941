"""Shared fixtures. The demo corpus is fetched once into a persistent cache (``$DEMO_CACHE`` or the default
``data.cache_dir``, ``~/.cache/encoder-pretrain``) that every test and ``make demo`` reuse."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_cache_dir() -> Path:
    """Cache directory holding ``demo-corpus/``; pass it as ``data.cache_dir`` to use the demo corpus."""
    path = Path(os.environ.get("DEMO_CACHE", "~/.cache/encoder-pretrain")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def bible_jsonl(demo_cache_dir) -> Path:
    """The demo corpus' ``bible`` part (1189 KJV chapters, ~4 MB), downloaded from a Debian mirror on first use."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the demo corpus needs Debian's apt-get and dpkg-deb")
    from pretrain.data import fetch_demo_corpus

    return fetch_demo_corpus(demo_cache_dir, ["bible"])["bible"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: extra intra-op threads only contend (10-20x slower under load). Use per module
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
