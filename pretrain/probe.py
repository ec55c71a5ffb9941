"""Linear probes of intermediate layers at evaluation time (``train.probe``): a fixed labelled task (by default the
WordNet supersense of a gloss), encoded without masking, mean-pooled over the tokens at a layer's output, and a
logistic regression fitted per layer; logged as ``probe_acc_layer{n}`` (n = transformer layers below the probed
output). Backprop runs probe the layers of ``train.probe.layers``; decoupled runs each chunk's output, in the process
that holds the chunk, so the two compare layer by layer (the local-updates paper's question whether lower chunks
learn the features the upper ones need).

The texts pass through the objective's own split protocol (``stem`` then ``layers``; a decoupled chunk's forward
without its head), as an ``Objective.clean_batch``: every token is itself and nothing is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.stream import to_device
from .evaluation import linear_probe, mean_pool, read_labelled, supersense_split

#: the probe split's seed (fixed: every run, layer and evaluation is scored on the same texts)
PROBE_SEED = 4321
#: texts per forward pass
PROBE_BATCH = 64


def load_examples(data: str, cache_dir: str) -> list[dict]:
    """``supersense`` (fetched with the demo corpus into ``cache_dir``) or a JSONL file of {"text", "label"}."""
    if data == "supersense":
        from .data import wordnet_supersense

        return wordnet_supersense(cache_dir)
    path = Path(data).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"train.probe.data: {data} is neither 'supersense' nor a JSONL file; point it at "
                                "a file of {\"text\": ..., \"label\": ...} lines or set it to null")
    return read_labelled(path)


@dataclass
class ProbeSet:
    """The probe's texts as clean padded batches on the device (sorted by length; ``order`` maps the rows of the
    concatenated batches to examples, train first) and their labels."""

    batches: list[dict]
    order: np.ndarray
    """[n_train + n_test] example index of each row of the concatenated batches."""
    labels: np.ndarray
    """[n_train + n_test] labels, train first."""
    n_train: int
    max_iter: int

    def score(self, pooled: list[torch.Tensor]) -> float:
        """Test accuracy of a logistic regression on pooled features: one [B, H] tensor per batch, in order."""
        features = np.empty((len(self.order), pooled[0].shape[1]), dtype=np.float32)
        features[self.order] = torch.cat(pooled).float().cpu().numpy()
        n, y = self.n_train, self.labels
        return linear_probe(features[:n], y[:n], features[n:], y[n:], max_iter=self.max_iter)["accuracy"]


def build_probe(cfg, objective, tokenizer, device) -> ProbeSet | None:
    """The run's probe set (None when ``train.probe.data`` is null)."""
    probe_cfg = cfg.train.probe
    if probe_cfg.data is None:
        return None
    train, test = supersense_split(load_examples(probe_cfg.data, cfg.data.cache_dir), probe_cfg.n_train,
                                   probe_cfg.n_test, seed=PROBE_SEED)
    examples = train + test
    ids = tokenizer([e["text"] for e in examples], truncation=True, max_length=probe_cfg.max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = []
    for start in range(0, len(order), PROBE_BATCH):
        batch = objective.clean_batch([torch.tensor(ids[i]) for i in order[start:start + PROBE_BATCH]])
        batches.append(to_device(batch, device))
    return ProbeSet(batches, order, np.array([e["label"] for e in examples]), len(train), probe_cfg.max_iter)


@torch.no_grad()
def probe_layers(probe: ProbeSet, objective, model, layers, share: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """``probe_acc_layer{n}`` of an end-to-end ``model`` for each layer number in ``layers`` (``all``: every
    one), through the objective's stem, layers and layer runner (in the model's current train/eval mode).
    ``share = (index, count)``: this caller fits only every count-th of those layers from the index-th on (data-
    parallel replicas hold the same weights, so they split the fits and gather the scores)."""
    stem, blocks, runner = objective.stem(model), objective.layers(model), objective.layer_runner(model)
    wanted = range(1, len(blocks) + 1) if layers == "all" else layers
    if max(wanted) > len(blocks):
        raise ValueError(f"train.probe.layers {list(wanted)}: the model has {len(blocks)} layers")
    index, count = share
    pooled: dict[int, list[torch.Tensor]] = {n: [] for n in list(wanted)[index::count]}
    if not pooled:
        return {}
    for batch in probe.batches:
        hidden = stem(batch)[0]
        context = runner.context(hidden, batch)
        for n, layer in enumerate(blocks[:max(pooled)], 1):
            hidden = runner.run(layer, hidden, context)
            if n in pooled:
                pooled[n].append(mean_pool(hidden, batch["attention_mask"]))
    return {f"probe_acc_layer{n}": probe.score(p) for n, p in pooled.items()}
