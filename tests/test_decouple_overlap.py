"""Overlapping local updates (``decouple.overlap: M``, Laskin et al. 2020): the gradients are those of the two local
losses with the upper one truncated M layers below the boundary, the isolation invariant restated for shared
layers, config checks. The runs (simulated == distributed, SIGKILL resume, export, data-parallel pipelines) are
tests/test_decouple.py's, parametrized with ``decouple.overlap=1``."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_config_rejected, make_tokenizer, packed_examples
from pretrain.config import config_from_dict

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "dist"))
import decouple_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(objective="mlm", chunks=2, overlap=1, layers=4, aux_head="decoder", dropout=0.0):
    tree = decouple_worker.base_config("unused")
    tree["objective"] = {"name": objective}
    tree["decouple"].update(chunks=chunks, overlap=overlap, aux_head=aux_head)
    tree["model"].update(num_layers=layers, hidden_dropout=dropout, attention_dropout=dropout)
    return config_from_dict(tree)


def micro_batches(collator, tok, n_micro=3, size=4):
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, n_micro * size, length=32))]
    return [collator.collate(examples[i * size:(i + 1) * size]) for i in range(n_micro)]


class ScaledLoss:
    """A chunk whose loss is multiplied by ``scale`` (everything else delegated)."""

    def __init__(self, chunk, scale: float):
        self.chunk, self.scale = chunk, scale

    def __getattr__(self, name):
        return getattr(self.chunk, name)

    def __call__(self, *args, **kwargs):
        outputs, out = self.chunk(*args, **kwargs)
        return outputs, {**out, "loss": self.scale * out["loss"]}


def window_gradients(cfg, tok, scales=None):
    """A fresh model (seed 0) and the gradients one optimizer step's window leaves in every chunk's parameters
    (captured where the update would run; nothing is stepped), with chunk k's loss multiplied by ``scales[k]``.
    Returns ``(model, micro_batches, normalizers, grads)``, grads: parameter name -> gradient."""
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import Pipeline, window_normalizers
    from pretrain.decouple.run import build_chunked_model

    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    pipeline = Pipeline(model, cfg, Layout("simulated", cfg.decouple.chunks, 1, 0), torch.device("cpu"))
    grads, names = {}, {id(p): name for name, p in model.named_parameters()}

    def capture(stage):
        def update(*args):
            grads.update({names[id(p)]: p.grad.clone() for p in stage.params})
            stage.optimizer.zero_grad(set_to_none=True)
        return update

    for k, stage in enumerate(pipeline.stages):
        stage.update = capture(stage)
        if scales is not None:
            stage.chunk = ScaledLoss(stage.chunk, scales[k])
    micro = micro_batches(collator, tok)
    norms = window_normalizers(collator, micro, "cpu")
    pipeline.train_step(micro, norms, 1e-3)
    assert all(not stage.pending and not stage.outbox for stage in pipeline.stages), "the window drained"
    return model, micro, norms, grads


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def shared_parameters(model, k: int, m: int) -> set[str]:
    """The names of chunk k's top ``m`` layers' parameters."""
    return names(model, [p for layer in model.chunks[k].layers[-m:] for p in layer.parameters()])


def test_gradients_are_both_local_losses_with_the_upper_one_truncated_below_the_shared_layers():
    """K=2, M=1 over 4 layers: chunk 0's gradients = ∂L0 (all of chunk 0) + ∂L1 through layer 1 only; the reference
    cuts the same weights at layer 1 instead of 2 and backpropagates L1 through that cut's upper chunk."""
    from pretrain.decouple.chunks import ChunkedModel

    tok = make_tokenizer()
    cfg = make_cfg(overlap=1)
    model, micro, norms, got = window_gradients(cfg, tok)
    shifted = ChunkedModel(model.model, model.objective, dataclasses.replace(cfg.decouple, boundaries=[1], overlap=0))
    model.zero_grad(set_to_none=True)
    for batch in micro:
        _, own = model.chunks[0](batch, None, norms)
        own["loss"].backward()
        below, _ = shifted.chunks[0](batch, None, norms, with_head=False)  # layer 0, detached at layer 1's input
        _, upper = shifted.chunks[1](batch, below, norms)  # layers 1-3 and the real head
        upper["loss"].backward()
    reference = dict(model.named_parameters())
    assert got.keys() == names(model, model.parameters()) and len(got) > 20
    for name, grad in got.items():
        torch.testing.assert_close(grad, reference[name].grad, rtol=1e-5, atol=1e-8, msg=name)
    # against disjoint chunks: chunk 0's top layer gains the upper loss's gradient, the layer below it does not
    _, _, _, disjoint = window_gradients(make_cfg(overlap=0), tok)
    layer0, layer1 = names(model, model.chunks[0].layers[0].parameters()), shared_parameters(model, 0, 1)
    assert layer1 and layer0 and not layer0 & layer1
    assert all(torch.equal(disjoint[n], got[n]) for n in layer0)
    assert not any(torch.equal(disjoint[n], got[n]) for n in layer1)


@pytest.mark.parametrize("objective, aux_head", [("mlm", "decoder"), ("span", "layer"), ("electra", "decoder")])
def test_scaling_one_chunks_loss_changes_only_the_gradients_it_reaches(objective, aux_head):
    """The isolation invariant with overlap (K=3, M=1 over 6 layers, dropout on): scaling chunk k's loss ×1000
    changes exactly the gradients of chunk k's parameters and of chunk k-1's top layer; every other gradient stays
    bit-identical."""
    tok = make_tokenizer()
    cfg = make_cfg(objective, chunks=3, overlap=1, layers=6, aux_head=aux_head, dropout=0.1)
    model, _, _, base = window_gradients(cfg, tok, [1.0, 1.0, 1.0])
    owned = [names(model, model.chunk_parameters(k)) for k in range(3)]
    assert all(len(o) > 4 for o in owned)
    for k in range(3):
        _, _, _, scaled = window_gradients(cfg, tok, [1000.0 if j == k else 1.0 for j in range(3)])
        reached = owned[k] | (shared_parameters(model, k - 1, 1) if k else set())
        assert scaled.keys() == base.keys() == set().union(*owned)
        changed = {i for i in base if not torch.equal(base[i], scaled[i])}
        assert changed == reached, f"chunk {k}: {len(changed - reached)} unreached changed, " \
                                   f"{len(reached - changed)} reached unchanged"


@pytest.mark.parametrize("tree, message", [
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": -1}}, "decouple.overlap must be >= 0"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "overlap": 1}},
     "overlap has no meaning with decouple.mode=synthetic"),
    ({"decouple": {"mode": "none", "overlap": 1}}, "overlap=1 needs decouple.mode=local and decouple.chunks >= 2"),
    ({"decouple": {"mode": "local", "chunks": 1, "overlap": 1}}, "needs decouple.mode=local and decouple.chunks >= 2"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1, "freeze_lower": True}},
     "freeze_lower freezes them: set one of them off"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 2}},
     r"overlap=2 must be smaller than the smallest chunk's layer count \(chunks of \[2, 2\] layers\)"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1, "boundaries": [1]}}, r"chunks of \[1, 3\] layers"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlap": 1}, "train": {"precision": "fp16"}},
     "use train.precision bf16 or fp32"),
    ({"decouple": {"mode": "local", "chunks": 2, "overlaps": 1}}, "did you mean 'decouple.overlap'"),
])
def test_bad_overlap_configs_fail_naming_the_fix(tree, message):
    assert_config_rejected(tree, message)


def test_default_is_disjoint_chunks_and_a_valid_overlap_uses_the_overlap_stage():
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.overlap import OverlapStage
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.stage import Stage

    assert make_cfg(overlap=0).decouple.overlap == 0 and config_from_dict(
        decouple_worker.base_config("unused")).decouple.overlap == 0
    tok = make_tokenizer()
    for overlap, kind in ((0, Stage), (1, OverlapStage)):
        cfg = make_cfg(overlap=overlap)
        model, _ = build_chunked_model(cfg, tok)
        stages = Pipeline(model, cfg, Layout("simulated", 2, 1, 0), torch.device("cpu")).stages
        assert [type(s) for s in stages] == [kind, kind]
    assert len(stages[0].shared) == len(list(model.chunks[0].layers[-1].parameters())) and not stages[1].shared
