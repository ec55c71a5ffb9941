"""Progress of the long data steps (tokenizer training, tokenizing + packing): work done, tokens/s and ETA.

On a terminal it is a tqdm bar redrawn in place; elsewhere (a log file, CI, a captured stream) it is one line every
``LINE_EVERY_S`` seconds plus a final one, so a log gets a few lines instead of thousands of redraws. Only the process
that builds a cache creates one (tokenizing workers never do), and a cached call builds nothing, so it prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

#: seconds between two progress lines when the stream is not a terminal
LINE_EVERY_S = 10.0


class Progress:
    """``total`` units of work (documents) and a running count of what they hold (tokens); a context manager.

    ``update(n, tokens)`` adds ``n`` units and ``tokens`` counted items; the display shows units done / total, the
    items' rate (``tok/s``: over the time since the start) and the ETA (from the units' rate).
    """

    def __init__(self, desc: str, total: int, unit: str = "doc", counted: str = "tok", stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.counted = desc, total, unit, counted
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.tokens = 0
        self.start = self._last_line = time.perf_counter()
        self._bar = None
        if self.stream.isatty():
            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, mininterval=0.5,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + unit
                             + "s [{elapsed}<{remaining}{postfix}]")

    def rate(self) -> float:
        """Counted items (tokens) per second since the start."""
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            self._bar.set_postfix_str(f"{tqdm.format_sizeof(self.rate())} {self.counted}/s", refresh=False)
            self._bar.update(n)
        elif time.perf_counter() - self._last_line >= LINE_EVERY_S:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done or self.tokens:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        self._last_line = now
        elapsed = now - self.start
        eta = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        percent = 100 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {percent:3.0f}% {self.done}/{self.total} {self.unit}s, {self.tokens} {self.counted}, "
              f"{tqdm.format_sizeof(self.rate())} {self.counted}/s, elapsed {tqdm.format_interval(elapsed)}, ETA "
              f"{tqdm.format_interval(eta) if eta == eta else '?'}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
