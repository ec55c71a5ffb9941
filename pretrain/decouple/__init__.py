"""Layer decoupling (DESIGN.md §4): the encoder cut into chunks that learn from local losses (mode local) or from
synthetic gradients (mode synthetic), run by one pipeline in one process (simulated) or one process per chunk.

``chunks``: cutting the model (the objective says how) and the per-chunk forward with detached inputs.
``stage``: one chunk's optimizer, RNG, metrics and checkpoint files; ``synthetic``: the synthetic-gradient modules
M_k and their stage; ``modes``: the registry of modes and their stages; ``run``: a run's model outside the
pipeline (build, load a checkpoint, export sidecars).
``layout``: which process runs which chunk; ``link``: the messages between them; ``pipeline``: one optimizer step,
evaluation and checkpoints of the chunks a process holds. The training loop (``pretrain.trainer.fit``) drives it
through ``pretrain.steps.decoupled.DecoupledStep``.
"""

from .chunks import Chunk, ChunkedModel, layer_ranges
from .pipeline import Pipeline
from .run import build_chunked_model, load_run

__all__ = ["Chunk", "ChunkedModel", "layer_ranges", "Pipeline", "build_chunked_model", "load_run"]
