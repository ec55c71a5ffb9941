""".npy files of ``[N, width]`` rows written incrementally, without knowing ``N`` up front, and sharded when large.

numpy pads a .npy header so that its first dimension can grow to 21 digits in place (``GROWTH_AXIS_MAX_DIGITS``):
the file starts with a header for 0 rows, rows are appended, and the header is rewritten with the final count (the
same length; checked). ``np.load(path, mmap_mode="r")`` reads the result like any .npy file.

An array of more than ``SHARD_TOKENS`` values (rows × width) is written as shards of whole rows, ``{stem}-00000.npy``,
``{stem}-00001.npy``, ...; one that fits stays the single file ``{stem}.npy`` (the layout written before sharding,
so those caches read unchanged). :func:`open_rows` memory-maps either as one ``[N, width]`` sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: values (tokens) per .npy file at most: beyond 2**31 (4 GiB of uint16 ids) an array is written as several shards
SHARD_TOKENS = 1 << 31


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
        shape, fortran_order, dtype = _read_header(f, path)
        data_start = f.tell()
        if fortran_order or not 0 <= rows <= shape[0]:
            raise ValueError(f"{path}: cannot keep {rows} of the rows of a {shape} array (fortran: {fortran_order})")
        f.seek(0)
        if _write_header(f, dtype, (rows, *shape[1:])) != data_start:
            raise RuntimeError(f"{path}: the .npy header changed length")
        f.truncate(data_start + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class ShardedAppender:
    """Append ``[n, width]`` rows to the array ``stem`` in ``directory``: shards of ``SHARD_TOKENS // width`` rows
    (at least one), renamed to the single file ``{stem}.npy`` on ``close()`` if one shard holds them all. The files
    of an earlier array ``stem`` there are deleted first (a split packed again replaces its first attempt)."""

    def __init__(self, directory: str | os.PathLike, stem: str, dtype, width: int):
        self.directory, self.stem, self.dtype, self.width = Path(directory), stem, np.dtype(dtype), width
        for old in [self.directory / f"{stem}.npy", *self.directory.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9].npy")]:
            old.unlink(missing_ok=True)
        self.rows_per_shard = max(1, SHARD_TOKENS // width)
        self.rows = 0
        self._shards: list[NpyAppender] = []

    def append(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"{self.stem}: rows of shape {rows.shape}, expected [n, {self.width}]")
        while len(rows):
            if not self._shards or self._shards[-1].rows == self.rows_per_shard:
                self._new_shard()
            shard = self._shards[-1]
            take = self.rows_per_shard - shard.rows
            shard.append(rows[:take])
            self.rows += len(rows[:take])
            rows = rows[take:]

    def close(self) -> None:
        if not self._shards:
            self._new_shard()  # an empty array is one file of 0 rows
        for shard in self._shards:
            shard.close()
        if len(self._shards) == 1:
            os.replace(self._shards[0].path, self.directory / f"{self.stem}.npy")

    def _new_shard(self) -> None:
        if self._shards:
            self._shards[-1].close()
        self._shards.append(NpyAppender(self.directory / f"{self.stem}-{len(self._shards):05d}.npy", self.dtype,
                                        self.width))

    def __enter__(self) -> "ShardedAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_paths(directory: str | os.PathLike, stem: str) -> list[Path]:
    """The files of the array ``stem``: ``[{stem}.npy]``, or its shards ``{stem}-00000.npy``, ... in order."""
    directory = Path(directory)
    single = directory / f"{stem}.npy"
    if single.exists():
        return [single]
    shards = sorted(directory.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9].npy"))
    if not shards or [p.name for p in shards] != [f"{stem}-{i:05d}.npy" for i in range(len(shards))]:
        raise FileNotFoundError(f"{directory}: no {stem}.npy and no complete run of shards {stem}-00000.npy, ... "
                                f"(found {[p.name for p in shards]})")
    return shards


class ShardedRows:
    """Several ``[n_k, width]`` arrays (memory-mapped shards) read as one ``[sum n_k, width]`` array: ``len``,
    ``shape``, ``dtype``, ``size``, a row ``rows[i]``, a slice ``rows[a:b]`` (a copy) and ``np.asarray(rows)``."""

    ndim = 2

    def __init__(self, shards: list[np.ndarray]):
        widths = {s.shape[1] for s in shards}
        dtypes = {s.dtype for s in shards}
        if len(widths) != 1 or len(dtypes) != 1 or any(s.ndim != 2 for s in shards):
            raise ValueError(f"shards of different shapes or dtypes: {[(s.shape, s.dtype) for s in shards]}")
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.starts[-1]), widths.pop())
        self.dtype = dtypes.pop()
        self.size = self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ShardedRows slices take every row (step 1)")
            parts = [s[max(start - lo, 0):stop - lo] for s, lo, hi in zip(self.shards, self.starts, self.starts[1:])
                     if lo < stop and start < hi]
            return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[k][i - self.starts[k]]

    def __array__(self, dtype=None, copy=None):
        return np.concatenate(self.shards).astype(dtype or self.dtype, copy=False)


def open_rows(directory: str | os.PathLike, stem: str) -> np.ndarray | ShardedRows:
    """Memory-map the array ``stem`` of ``directory``: a ``np.memmap`` for one file, ``ShardedRows`` for shards."""
    paths = shard_paths(directory, stem)
    shards = [np.load(p, mmap_mode="r") for p in paths]
    return shards[0] if len(shards) == 1 else ShardedRows(shards)


def truncate_rows(directory: str | os.PathLike, stem: str, rows: int) -> None:
    """Keep the first ``rows`` rows of the array ``stem`` (in place): the shard holding the cut is truncated, the
    later ones are deleted, and one remaining shard becomes ``{stem}.npy``."""
    paths = shard_paths(directory, stem)
    start = 0
    for k, path in enumerate(paths):
        with open(path, "rb") as f:
            n = _read_header(f, path)[0][0]
        if rows <= start + n or k == len(paths) - 1:
            truncate_npy(path, rows - start)
            for later in paths[k + 1:]:
                later.unlink()
            if k == 0 and len(paths) > 1:
                os.replace(path, Path(directory) / f"{stem}.npy")
            return
        start += n


def _read_header(f, path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the version 1.0 .npy file ``f`` (open at its start); leaves ``f`` at its
    data."""
    version = np.lib.format.read_magic(f)
    if version != (1, 0):
        raise ValueError(f"{path}: .npy format version {version}, expected (1, 0) (written by NpyAppender)")
    return np.lib.format.read_array_header_1_0(f)


def _write_header(f, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Write a version 1.0 header at the file position; returns the offset where the data starts."""
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return f.tell()
