"""Layer decoupling (DESIGN.md §4): the encoder cut into chunks that learn from local losses (mode local) or from
synthetic gradients (mode synthetic).

``chunks``: cutting the model, auxiliary heads, the per-chunk forward with detached inputs.
``synthetic``: the synthetic-gradient modules M_k and the per-chunk logic that uses and trains them.
``runtime``: the simulated (one process) and distributed (one process per chunk) runtimes and ``fit_decoupled``,
which ``pretrain.trainer.fit`` calls when ``decouple.mode`` is not ``none``.
"""

from .chunks import Chunk, ChunkedModel, layer_ranges
from .runtime import export_run, fit_decoupled, load_run

__all__ = ["Chunk", "ChunkedModel", "layer_ranges", "fit_decoupled", "export_run", "load_run"]
