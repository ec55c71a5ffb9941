"""ELECTRA on ``model.arch: roberta | modernbert`` (objectives/electra.py): the arch's stock ``*ForMaskedLM``
generator and one-label ``*ForTokenClassification`` discriminator.

The training loss and every gradient equal a hand-computed reference built from the stock classes alone (the
generator's own ``labels=`` MLM loss plus λ times the BCE of the discriminator's ``logits[..., 0]`` on the same
replaced block); the replacements are the counter-based Gumbel-max samples of the stock generator's logits; the
embeddings are one module at equal widths and the generator's own otherwise; both exports reload through their Auto
classes in a fresh process; a run resumes exactly; local decoupling's chunks recompose the loss, and ModernBERT's
distributed run equals the simulated one.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from helpers import gradients, make_tokenizer, packed_batch, tiny_model_config, train_records, worker_run
from objectives import BACKBONES, IGNORE_INDEX, get_objective
from objectives.backbones import ModernBertOptions
from objectives.electra import gumbel_sample
from pretrain.config import load_config

ARCHS = ["roberta", "modernbert"]
#: ModernBERT whose local layers see less than a 32-token block (as in test_backbones.py)
MODERNBERT = dict(global_attn_every_n_layers=2, local_attention=8, global_rope_theta=1000.0, local_rope_theta=50.0)
MODERNBERT_OVERRIDES = ["model.arch=modernbert", *(f"model.modernbert.{k}={v}" for k, v in MODERNBERT.items())]
DISC_WEIGHT = 7.0


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def build(tokenizer, arch: str, generator_size: float = 0.25, **options):
    """A 3-layer ELECTRA of ``arch`` (dropout 0); weights moved away from the init so biases and norms matter."""
    objective = get_objective("electra", tokenizer, seed=3, generator_size=generator_size, disc_weight=DISC_WEIGHT,
                              **options)
    cfg = tiny_model_config(arch=arch, num_layers=3)
    if arch == "modernbert":
        cfg.sections = types.SimpleNamespace(modernbert=ModernBertOptions(**MODERNBERT))
    torch.manual_seed(0)
    model = objective.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return objective, model


def reference_loss(model, batch, disc_input_ids):
    """Stock classes only: the generator's ``labels=`` loss + λ x mean BCE of ``logits[..., 0]`` (written out) over
    the non-pad positions, "replaced" being where the corrupted block differs from the original."""
    mask = batch["attention_mask"]
    gen = model.generator(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    logit = model.discriminator(input_ids=disc_input_ids, attention_mask=mask).logits[..., 0]
    replaced = (disc_input_ids != batch["original_ids"]).float()
    bce = -(replaced * F.logsigmoid(logit) + (1 - replaced) * F.logsigmoid(-logit))
    return gen.loss + DISC_WEIGHT * bce[mask.bool()].mean(), gen.logits


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch", ARCHS)
def test_the_networks_are_the_archs_stock_classes_sharing_embeddings_at_equal_width(tokenizer, arch):
    names = {"roberta": ("RobertaForMaskedLM", "RobertaForTokenClassification"),
             "modernbert": ("ModernBertForMaskedLM", "ModernBertForTokenClassification")}[arch]
    backbone = BACKBONES[arch]
    for generator_size in (0.25, 1.0):
        _, model = build(tokenizer, arch, generator_size)
        gen, disc = model.generator, model.discriminator
        assert (type(gen).__name__, type(disc).__name__) == names and disc.config.num_labels == 1
        assert gen.config.hidden_size == round(32 * generator_size) and gen.config.num_hidden_layers == 3
        assert gen.config.intermediate_size == round(64 * generator_size)  # the arch's own feed-forward ratio
        # the generator's decoder reads the table its embeddings use (shared or its own)
        assert backbone.decoder(gen).weight is backbone.word_embeddings(gen).weight
        shared = backbone.embeddings(gen) is backbone.embeddings(disc)
        assert shared == (generator_size == 1.0)
        shared_ids = {id(p) for p in model.shared_parameters()}
        assert shared_ids == ({id(p) for p in backbone.embeddings(disc).parameters()} if shared else set())


def test_an_embedding_size_without_a_projection_is_refused(tokenizer):
    objective = get_objective("electra", tokenizer)
    with pytest.raises(ValueError, match="embedding projection"):
        objective.build_model(tiny_model_config(arch="roberta", embedding_size=16))


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("generator_size", [0.25, 1.0], ids=["own-embeddings", "shared-embeddings"])
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_the_stock_reference(tokenizer, arch, padded, generator_size):
    """Our loss (sparse generator head, Gumbel-max corruption, BCE) equals the reference on the block we corrupted,
    with the same gradient on every parameter, also on the fast path's static shapes."""
    objective, model = build(tokenizer, arch, generator_size)
    batch = packed_batch(tokenizer, objective, padded)
    aux = objective.loss_sums(model, batch)[3]
    assert 0 < aux["replaced"].sum() < batch["attention_mask"].sum()  # both classes are present
    reference, _ = reference_loss(model, batch, aux["disc_input_ids"])
    expected = gradients(model, reference)
    assert expected.keys() == {n for n, _ in model.named_parameters()}
    for static in (False, True):
        objective.static_shapes = static
        ours = objective(model, batch)
        torch.testing.assert_close(ours["loss"], reference, rtol=1e-6, atol=1e-6)
        grads = gradients(model, ours["loss"])
        assert grads.keys() == expected.keys()
        for name in grads:
            # fp32 summation order: entries of order 1 differ by ~1e-6 (a wrong weight or target is off by O(1))
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_replacements_are_the_gumbel_samples_of_the_stock_generator(tokenizer, arch):
    """The corrupted block holds, at each masked position, argmax(stock generator logits / T + Gumbel noise keyed
    by (seed, sample index, position)): the sampling every arch shares."""
    objective, model = build(tokenizer, arch, temperature=0.7)
    batch = packed_batch(tokenizer, objective, padded=True)
    with torch.no_grad():
        aux = objective.loss_sums(model, batch)[3]
        _, logits = reference_loss(model, batch, aux["disc_input_ids"])
    rows, cols = torch.nonzero(batch["labels"] != IGNORE_INDEX, as_tuple=True)
    expected = gumbel_sample(logits[rows, cols], 3, batch["sample_index"][rows], cols, temperature=0.7)
    assert torch.equal(aux["disc_input_ids"][rows, cols], expected)
    untouched = torch.ones_like(batch["labels"], dtype=torch.bool)
    untouched[rows, cols] = False
    assert torch.equal(aux["disc_input_ids"][untouched], batch["original_ids"][untouched])
    assert torch.equal(aux["replaced"], aux["disc_input_ids"] != batch["original_ids"])


@pytest.mark.parametrize("arch", ARCHS)
def test_disc_loss_sends_no_gradient_into_a_generator_with_its_own_embeddings(tokenizer, arch):
    objective, model = build(tokenizer, arch)
    objective.config.disc_weight = 1.0
    objective.loss_parts = {"gen_loss": ("n_masked", 0.0), "disc_loss": ("n_tokens", 1.0)}
    out = objective(model, packed_batch(tokenizer, objective, padded=False))
    gen = torch.autograd.grad(out["loss"], list(model.generator.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in gen)
    disc = torch.autograd.grad(out["loss"], list(model.discriminator.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in disc)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_fast_path_keeps_the_loss_and_traces_the_step_as_one_graph(tokenizer, arch):
    """Static shapes, both networks' stacks fused on roberta (none on modernbert, whose Wqkv is one GEMM); the
    trainer's module (sampling included) traces without a graph break."""
    from pretrain.fast import FusedEncoder, apply_fast_path
    from pretrain.steps.backprop import PretrainModule

    objective, model = build(tokenizer, arch)
    batch = packed_batch(tokenizer, objective, padded=False)
    eager = objective(model, batch)["loss"]
    apply_fast_path(model, objective, 32)
    assert objective.static_shapes
    assert sum(isinstance(m, FusedEncoder) for m in model.modules()) == {"roberta": 2, "modernbert": 0}[arch]
    torch.testing.assert_close(objective(model, batch)["loss"], eager, rtol=1e-6, atol=1e-6)
    explained = torch._dynamo.explain(PretrainModule(model, objective))(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# --------------------------------------------------------------------------- export, runs, config


@pytest.mark.parametrize("generator_size", [0.25, 1.0], ids=["own-embeddings", "shared-embeddings"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exports_reload_through_their_auto_classes_in_a_fresh_process(tokenizer, arch, generator_size, tmp_path,
                                                                       capsys):
    """``write_export`` with a sample checks every ``export_targets`` entry in a fresh offline process (within
    1e-5); the reloaded discriminator's ``logits[..., 0]`` is the training replaced-token logit."""
    from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer

    from objectives.electra import discriminator_logits
    from pretrain.export import write_export

    objective, model = build(tokenizer, arch, generator_size)
    model.eval()
    batch = packed_batch(tokenizer, objective, padded=False)
    cfg = load_config(None, ["data.files=[x.txt]", "objective.name=electra",
                             *(MODERNBERT_OVERRIDES if arch == "modernbert" else [f"model.arch={arch}"])])
    write_export(objective, model, tmp_path / "export", tokenizer, cfg, sample=batch["original_ids"])
    out = capsys.readouterr().out
    for sub, auto in (("discriminator", "AutoModelForTokenClassification"), ("generator", "AutoModelForMaskedLM")):
        assert f"exported {tmp_path / 'export' / sub}: reloaded as" in out
        assert AutoTokenizer.from_pretrained(tmp_path / "export" / sub).get_vocab() == tokenizer.get_vocab()
    assert [a for _, a, _ in objective.export_targets(model, tmp_path / "export")] == [
        "AutoModelForTokenClassification", "AutoModelForMaskedLM"]
    disc = AutoModelForTokenClassification.from_pretrained(tmp_path / "export" / "discriminator").eval()
    gen = AutoModelForMaskedLM.from_pretrained(tmp_path / "export" / "generator").eval()
    assert type(disc) is type(model.discriminator) and type(gen) is type(model.generator)
    ids = batch["input_ids"]
    with torch.no_grad():
        theirs = disc(input_ids=ids).logits[..., 0]
        ours = discriminator_logits(model.discriminator, ids, batch)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gen(input_ids=ids).logits, model.generator(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_resumed_run_equals_the_uninterrupted_one(arch, tmp_path, monkeypatch, capsys):
    """Backprop ELECTRA, 3 steps, then resumed to 6 from the step-3 checkpoint: the same losses as 6 steps in one
    go; the export command rebuilds both networks from the last checkpoint with the weights the run exported."""
    from safetensors.torch import load_file

    from pretrain.export import export_checkpoint

    base = ["decouple.mode=none", "decouple.chunks=1", "train.save_every=3", "train.eval_every=0",
            "objective.name=electra", *(MODERNBERT_OVERRIDES if arch == "modernbert" else [f"model.arch={arch}"])]
    whole = worker_run(tmp_path / "whole", base, monkeypatch)
    worker_run(tmp_path / "resumed", [*base, "train.max_steps=3"], monkeypatch)
    capsys.readouterr()
    resumed = worker_run(tmp_path / "resumed", base, monkeypatch)
    assert "(step 3)" in capsys.readouterr().out
    assert sorted(whole) == sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        for key in ("loss", "gen_loss", "disc_loss"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6), (step, key)
    assert whole[6]["loss"] < whole[1]["loss"]
    again = export_checkpoint(tmp_path / "resumed", out=tmp_path / "again")
    for sub in ("discriminator", "generator"):
        a = load_file(str(again / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "export" / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- decoupling (mode local)


@pytest.mark.parametrize("generator_size", [0.25, 1.0], ids=["own-embeddings", "shared-embeddings"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunks_recompose_the_models_loss(tokenizer, arch, generator_size):
    """K=2 and K=3 chunks of the discriminator: chunk 0's generator loss and the last chunk's discriminator loss equal
    the whole model's (every layer keeps its positions and attention type), the chunks own every parameter once, and
    the auxiliary heads are in the arch's style."""
    from pretrain.config import DecoupleConfig
    from pretrain.decouple.chunks import ChunkedModel

    for chunks, boundaries in ((2, [1]), (3, [1, 2])):
        objective, model = build(tokenizer, arch, generator_size)
        model.eval()
        batch = packed_batch(tokenizer, objective, padded=True)
        chunked = ChunkedModel(model, objective, DecoupleConfig(mode="local", chunks=chunks, boundaries=boundaries,
                                                                aux_head="layer")).eval()
        owned = [{id(p) for p in chunked.chunk_parameters(k)} for k in range(chunks)]
        assert sum(map(len, owned)) == len(set().union(*owned))  # disjoint
        assert {id(p) for p in model.parameters()} <= set().union(*owned)
        assert {id(p) for p in model.generator.parameters()} <= owned[0]  # the generator runs in chunk 0
        with torch.no_grad():
            whole = objective(model, batch)
            inputs, outs = None, []
            for chunk in chunked.chunks:
                inputs, out = chunk(batch, inputs)
                outs.append(out)
        torch.testing.assert_close(outs[0]["gen_loss"], whole["gen_loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[-1]["disc_loss"], whole["disc_loss"], rtol=1e-5, atol=1e-6)
        head = chunked.aux[0]
        assert type(head).__name__ == "LocalTokenRTDHead"
        assert type(head.layer).__name__ == {"roberta": "BertLayer", "modernbert": "ModernBertEncoderLayer"}[arch]


def test_modernbert_local_decoupling_distributed_equals_simulated(tmp_path, monkeypatch):
    """ELECTRA on ModernBERT, two gloo processes (chunk 0 with the generator | chunk 1) against the simulated
    runtime: the same losses per chunk at every step; the stitched exports reload with the training logits."""
    from pathlib import Path

    from distributed import torchrun

    from pretrain.decouple.run import load_run
    from pretrain.hf_io import roundtrip_check

    worker = str(Path(__file__).parent / "dist" / "decouple_worker.py")
    args = [*MODERNBERT_OVERRIDES, "objective.name=electra", "train.eval_every=0", "train.save_every=0"]
    sim = worker_run(tmp_path / "sim", args, monkeypatch)
    torchrun(2, worker, str(Path(__file__).parent), str(tmp_path / "dist"), *args, timeout=240,
             env={"SKIP_ROUNDTRIP": "1"})
    dist = train_records(tmp_path / "dist")
    assert sorted(dist) == sorted(sim) == list(range(1, 7))
    keys = ("chunk0_disc_loss", "chunk1_disc_loss", "gen_loss", "disc_loss")
    assert all(key in sim[1] for key in keys), sorted(sim[1])
    for step in dist:
        for key in keys:
            assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)
    chunked, tok, _ = load_run(tmp_path / "dist")
    ids = tok(["the quick brown fox jumps over the lazy dog", "seven wizards box"], padding=True, return_tensors="pt")
    stitched = chunked.export_model()
    for sub, auto, reference in (("discriminator", "AutoModelForTokenClassification", stitched.discriminator),
                                 ("generator", "AutoModelForMaskedLM", stitched.generator)):
        result = roundtrip_check(tmp_path / "dist" / "export" / sub, auto, reference, ids["input_ids"],
                                 ids["attention_mask"])
        assert result["class"].startswith("ModernBert") and result["max_abs_err"] <= 1e-5
