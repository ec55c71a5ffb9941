"""Layer decoupling (DESIGN.md §4): the encoder cut into chunks that learn from local losses (mode local) or from
synthetic gradients (mode synthetic), run by one pipeline in one process (simulated) or one process per chunk.

``modes``: the registry of decoupling modes (options section, per-chunk stage class); light, read by the config.
``ranges``: which layers each chunk owns (light, read by the config); ``chunks``: cutting the model (the objective
says how) and the per-chunk forward with detached inputs.
``stage``: one chunk's optimizer, RNG, metrics and checkpoint files; ``overlap``: its variant for overlapping local
updates (layers shared across a boundary); ``synthetic``: the synthetic-gradient modules M_k and their stage.
``layout``: which process runs which chunk; ``link``: the messages between them; ``pipeline``: one optimizer step,
evaluation and checkpoints of the chunks a process holds; ``run``: a run's model outside the pipeline (build, load
a checkpoint, export sidecars). The training loop (``pretrain.trainer.fit``)
drives the pipeline through ``pretrain.steps.decoupled.DecoupledStep``.

This package's ``__init__`` imports nothing, so that the config can read ``modes`` without loading the rest.
"""
