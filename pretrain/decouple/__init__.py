"""Layer decoupling (DESIGN.md §4): the encoder cut into chunks that learn from local losses (mode local) or from
synthetic gradients (mode synthetic).

``modes``: the registry of decoupling modes (options section, per-chunk stage class); light, read by the config.
``chunks``: cutting the model, auxiliary heads, the per-chunk forward with detached inputs.
``synthetic``: the synthetic-gradient modules M_k and the per-chunk logic that uses and trains them.
``runtime``: the simulated (one process) and distributed (one process per chunk) runtimes and ``fit_decoupled``,
which ``pretrain.trainer.fit`` calls when ``decouple.mode`` is not ``none``.

The names below are imported on first use, so that ``pretrain.decouple.modes`` loads without torch.
"""

import importlib

_EXPORTS = {"Chunk": "chunks", "ChunkedModel": "chunks", "layer_ranges": "chunks",
            "fit_decoupled": "runtime", "export_run": "runtime", "load_run": "runtime"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
