"""Which layers each chunk owns: light (no torch), so the config can check chunk sizes (``decouple.overlap``)."""

from __future__ import annotations


def layer_ranges(num_layers: int, chunks: int, boundaries: str | list[int] = "auto") -> list[tuple[int, int]]:
    """[start, stop) layer indices of each chunk. ``auto`` balances the layer count; the remainder goes to the
    upper chunks (chunk 0 also runs the embeddings). An explicit list gives the first layer of chunks 1..K-1."""
    if not 1 <= chunks <= num_layers:
        raise ValueError(f"decouple.chunks must be between 1 and the number of layers ({num_layers}), got {chunks}")
    if boundaries == "auto":
        sizes = [num_layers // chunks + (1 if k >= chunks - num_layers % chunks else 0) for k in range(chunks)]
        starts = [sum(sizes[:k]) for k in range(chunks)]
    else:
        starts = [0, *boundaries]
        if len(starts) != chunks or starts != sorted(set(starts)) or starts[-1] >= num_layers:
            raise ValueError(f"decouple.boundaries {boundaries} must be {chunks - 1} strictly increasing layer "
                             f"indices in [1, {num_layers - 1}]")
    stops = starts[1:] + [num_layers]
    return list(zip(starts, stops))
