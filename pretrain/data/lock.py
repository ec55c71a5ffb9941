"""One builder per cache entry, however many processes or machines want it.

Every cache entry (a tokenizer, a block set) is written to a temporary directory and renamed into place with its
marker file last, so a half-written entry is never read. :func:`build_lock` adds that only one process builds it: the
others wait on ``<entry>.lock`` (an exclusive ``flock``) and then read the finished entry. ``flock`` is released
by the kernel when its holder dies, so a killed builder never leaves a stale lock; the lock files stay (tiny, and
deleting them would race). Across machines the cache folder must be on a file system whose locks reach every client
(NFS v4 or NFS v3 with lockd: Linux maps ``flock`` onto NFS locks; Lustre: mount with ``-o flock``).
"""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


@contextmanager
def build_lock(entry: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock of cache ``entry`` (a directory path; ``what`` names it in the waiting message)
    while checking for it and, if missing, building it."""
    lock = entry.parent / f"{entry.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("%s: another process is preparing %s; waiting for it (lock %s)", what, entry, lock)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
