""".npy files of ``[N, width]`` rows written incrementally, without knowing ``N`` up front.

numpy pads a .npy header so that its first dimension can grow to 21 digits in place (``GROWTH_AXIS_MAX_DIGITS``):
the file starts with a header for 0 rows, rows are appended, and the header is rewritten with the final count (the
same length; checked). ``np.load(path, mmap_mode="r")`` reads the result like any .npy file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class NpyAppender:
    """Append ``[n, width]`` arrays of one dtype to a new .npy file at ``path``; ``close()`` writes the shape."""

    def __init__(self, path: str | os.PathLike, dtype, width: int):
        self.path, self.dtype, self.width, self.rows = Path(path), np.dtype(dtype), width, 0
        self._file = open(self.path, "wb")
        self._data_start = _write_header(self._file, self.dtype, (0, width))

    def append(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape}, expected [n, {self.width}]")
        self._file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        if _write_header(self._file, self.dtype, (self.rows, self.width)) != self._data_start:
            raise RuntimeError(f"{self.path}: the .npy header changed length")  # numpy without in-place growth
        self._file.close()

    def __enter__(self) -> "NpyAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_npy(path: str | os.PathLike, rows: int) -> None:
    """Keep the first ``rows`` rows of the C-ordered .npy file ``path`` (in place)."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version != (1, 0):
            raise ValueError(f"{path}: .npy format version {version}, expected (1, 0) (written by NpyAppender)")
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        data_start = f.tell()
        if fortran_order or not 0 <= rows <= shape[0]:
            raise ValueError(f"{path}: cannot keep {rows} of the rows of a {shape} array (fortran: {fortran_order})")
        f.seek(0)
        if _write_header(f, dtype, (rows, *shape[1:])) != data_start:
            raise RuntimeError(f"{path}: the .npy header changed length")
        f.truncate(data_start + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _write_header(f, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Write a version 1.0 header at the file position; returns the offset where the data starts."""
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return f.tell()
