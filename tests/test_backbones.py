"""``model.arch`` (objectives/backbones.py): BERT, RoBERTa and ModernBERT as registry entries.

For each arch: the ``model`` section maps onto the stock config; our sparse-head loss equals the stock
``*ForMaskedLM``'s own loss (``labels=``) with the same gradients on every parameter (fp32, dropout 0, as litgpt tests
against HF); the layer runner (chunks, probes) reproduces the stock encoder layer by layer, RoPE and local/global
attention included; the decoupled chunks recompose the model's loss; MLM and SpanBERT exports reload in a fresh
process; the fast path fuses query/key/value only where the arch does not; a run resumes exactly; local decoupling
gives the same run simulated and as 2 gloo processes.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))  # decouple_worker (also as a torchrun worker)

from helpers import (gradients, make_tokenizer, packed_batch, probes_both_routes, tiny_model_config, train_records,
                     worker_run)
from objectives import BACKBONES, backbone_of, get_objective
from objectives.backbones import ModernBertOptions
from pretrain.config import ConfigError, load_config

TESTS = Path(__file__).parent
WORKER = str(TESTS / "dist" / "decouple_worker.py")
ARCHS = list(BACKBONES)
#: ModernBERT small enough that its local layers see less than a 32-token block, with two global layers of four
MODERNBERT = dict(global_attn_every_n_layers=2, local_attention=8, global_rope_theta=1000.0, local_rope_theta=50.0)
#: the same as overrides of the torchrun worker
MODERNBERT_OVERRIDES = ["model.arch=modernbert", *(f"model.modernbert.{k}={v}" for k, v in MODERNBERT.items())]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def model_config(arch: str, **overrides):
    """A 4-layer model of ``arch`` (dropout 0); ModernBERT with :data:`MODERNBERT`."""
    cfg = tiny_model_config(arch=arch, num_layers=4, **overrides)
    if arch == "modernbert":
        cfg.sections = types.SimpleNamespace(modernbert=ModernBertOptions(**MODERNBERT))
    return cfg


def build(tokenizer, arch: str, name: str = "mlm", **options):
    objective = get_objective(name, tokenizer, seed=0, **options)
    objective.set_unigram_counts(torch.ones(len(tokenizer)))
    torch.manual_seed(0)
    return objective, objective.build_model(model_config(arch))


# --------------------------------------------------------------------------- config


def test_the_model_section_maps_onto_each_arch(tokenizer):
    mlm = get_objective("mlm", tokenizer)
    for arch, cls in (("bert", "BertForMaskedLM"), ("roberta", "RobertaForMaskedLM"),
                      ("modernbert", "ModernBertForMaskedLM")):
        model = mlm.build_model(model_config(arch))
        cfg = model.config
        assert type(model).__name__ == cls and backbone_of(model) is BACKBONES[arch]
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 4, 2, 64)
        assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == tokenizer.pad_token_id
        assert cfg._attn_implementation == "sdpa"
    roberta = mlm.build_model(model_config("roberta")).config
    # position ids run pad+1 .. pad+L: 128 positions need 128 + pad + 1 rows; a single token type
    assert roberta.max_position_embeddings == 128 + tokenizer.pad_token_id + 1 and roberta.type_vocab_size == 1
    modern = mlm.build_model(model_config("modernbert")).config
    assert modern.layer_types == ["full_attention", "sliding_attention"] * 2
    assert modern.local_attention == 8 and modern.sliding_window == 4
    assert modern.rope_parameters["full_attention"]["rope_theta"] == 1000.0
    assert modern.rope_parameters["sliding_attention"]["rope_theta"] == 50.0
    assert (modern.cls_token_id, modern.sep_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert (modern.bos_token_id, modern.eos_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=gpt2"], "model.arch: 'gpt2' is not one of bert, roberta, modernbert"),
    (["model.arch=modernbrt"], "did you mean 'modernbert'"),
    (["model.arch=modernbert", "model.modernbert.local_atention=64"],
     "did you mean 'model.modernbert.local_attention'"),
    (["model.modernbert.local_attention=64"],
     "model.modernbert.local_attention is set but model.arch=bert: set model.arch=modernbert"),
    (["model.arch=modernbert", "model.modernbert.local_attention=7"], "local_attention must be an even number"),
    (["model.arch=modernbert", "model.modernbert.global_attn_every_n_layers=0"], "must be >= 1"),
])
def test_bad_arch_configs_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["data.files=[x.txt]", *overrides])


def test_an_objective_restricted_to_some_archs_is_refused_naming_the_others(monkeypatch):
    """``Objective.archs`` (no built-in objective restricts it: a registered one may)."""
    from objectives.span import SpanObjective

    monkeypatch.setattr(SpanObjective, "archs", ("bert",))
    with pytest.raises(ConfigError, match="objective span trains model.arch bert only, got model.arch=modernbert: "
                                          "set model.arch=bert, or objective.name mlm or electra"):
        load_config(None, ["data.files=[x.txt]", "model.arch=modernbert", "objective.name=span"])


def test_a_config_without_model_arch_is_bert():
    cfg = load_config(None, ["data.files=[x.txt]"])
    assert cfg.model.arch == "bert" and cfg.model.modernbert == ModernBertOptions()
    modern = load_config(None, ["data.files=[x.txt]", "model.arch=modernbert", "model.modernbert.local_attention=64"])
    assert modern.model.modernbert.local_attention == 64


# --------------------------------------------------------------------------- parity with the stock classes


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_the_stock_models_own(tokenizer, arch, padded):
    """Our sparse-head MLM loss (sum / count over the gathered rows) is ``model(..., labels=).loss`` and backward
    gives the same gradient on every parameter; on the fast path's static shapes too."""
    objective, model = build(tokenizer, arch, static_count=True)
    batch = packed_batch(tokenizer, objective, padded)
    stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    stock_grads = gradients(model, stock.loss)
    for static in (False, True):
        objective.static_shapes = static
        ours = objective(model, batch)
        torch.testing.assert_close(ours["loss"], stock.loss, rtol=1e-6, atol=1e-6)
        grads = gradients(model, ours["loss"])
        assert grads.keys() == stock_grads.keys() == {n for n, _ in model.named_parameters()}
        for name in grads:
            torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_span_mlm_part_equals_the_stock_loss_and_sbo_reads_the_decoder(tokenizer, arch):
    objective, model = build(tokenizer, arch, "span")
    batch = packed_batch(tokenizer, objective, padded=True)
    out = objective(model, batch)
    stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(out["mlm_loss"], stock.loss, rtol=1e-6, atol=1e-6)
    backbone = BACKBONES[arch]
    assert backbone.decoder(model).weight is model.get_input_embeddings().weight  # tied
    assert objective.sbo_head.norm1.eps == backbone.norm_eps(model.config)
    assert objective.sbo_head.dense1.out_features == model.config.hidden_size
    backbone.untie(model)  # a decoupled run's SBO head reads the untied decoder: zero it, and SBO is uniform
    with torch.no_grad():
        backbone.decoder(model).weight.zero_()
        out = objective(model, batch)
    torch.testing.assert_close(out["sbo_loss"], torch.tensor(len(tokenizer)).log())


@pytest.mark.parametrize("arch", ARCHS)
def test_the_layer_runner_reproduces_the_stock_encoder_layer_by_layer(tokenizer, arch):
    """Stem, then each layer with the runner's context, then the final norm: the stock encoder's hidden states
    (``output_hidden_states``), padded batch and ModernBERT's local layers included."""
    objective, model = build(tokenizer, arch)
    model.eval()
    batch = packed_batch(tokenizer, objective, padded=True)
    backbone = BACKBONES[arch]
    with torch.no_grad():
        stock = backbone.encoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        output_hidden_states=True)
        runner = objective.layer_runner(model)
        hidden = objective.stem(model)(batch)[0]
        context = runner.context(hidden, batch)
        states = [hidden]
        for layer in objective.layers(model):
            states.append(runner.run(layer, states[-1], context))
        final = backbone.final_norm(model)(states[-1])
    keep = batch["attention_mask"].bool()  # padding rows may differ (their attention is masked out)
    # HF's last entry is ``last_hidden_state``: after the final norm
    assert len(stock.hidden_states) == len(states) == 5
    for n, (a, b) in enumerate(zip([*states[:-1], final], stock.hidden_states)):
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5, msg=f"layer {n}")
    if arch == "modernbert":  # the local window bites: a layer given the global context instead computes otherwise
        sliding = objective.layers(model)[1]
        assert sliding.attention_type == "sliding_attention"
        wrong = {"sliding_attention": context["full_attention"], "full_attention": context["full_attention"]}
        assert not torch.allclose(runner.run(sliding, states[1], wrong), states[2], atol=1e-4)


@pytest.mark.parametrize("name", ["mlm", "span"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunks_recompose_the_models_loss(tokenizer, arch, name):
    """K=2 and K=3 chunks (decouple local) of the untied model: the last chunk's loss parts equal the whole model's,
    so every layer keeps its positions and attention type in its chunk; the auxiliary heads are the arch's."""
    from pretrain.config import DecoupleConfig
    from pretrain.decouple.chunks import ChunkedModel

    for chunks, boundaries in ((2, [1]), (3, [1, 3])):
        objective, model = build(tokenizer, arch, name)
        model.eval()
        batch = packed_batch(tokenizer, objective, padded=True)
        chunked = ChunkedModel(model, objective, DecoupleConfig(mode="local", chunks=chunks, boundaries=boundaries,
                                                                aux_head="layer")).eval()
        assert not model.config.tie_word_embeddings
        owned = [{id(p) for p in chunked.chunk_parameters(k)} for k in range(chunks)]
        assert sum(map(len, owned)) == len(set().union(*owned))  # disjoint
        assert {id(p) for p in model.parameters()} <= set().union(*owned)  # every model parameter trains somewhere
        with torch.no_grad():
            whole = objective(model, batch)
            inputs = None
            for chunk in chunked.chunks:
                inputs, out = chunk(batch, inputs)
        for part in objective.loss_parts:
            torch.testing.assert_close(out[part], whole[part], rtol=1e-5, atol=1e-6, msg=part)
        head = chunked.aux[0]
        assert type(head.layer).__name__ == {"bert": "BertLayer", "roberta": "BertLayer",
                                             "modernbert": "ModernBertEncoderLayer"}[arch]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["mlm", "span"])
@pytest.mark.parametrize("arch", ["roberta", "modernbert"])
def test_export_reloads_as_the_stock_class_in_a_fresh_process(tokenizer, arch, name, tmp_path):
    """``write_export`` with a sample: every ``export_targets`` entry reloads through its Auto class offline with
    logits within 1e-5; the tokenizer is ours; SpanBERT's sidecar SBO head reproduces the training SBO logits."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from objectives.span import load_sbo_head
    from pretrain.config import load_config
    from pretrain.export import write_export

    objective, model = build(tokenizer, arch, name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from the init: LayerNorms and biases matter too
    model.eval()
    batch = packed_batch(tokenizer, objective, padded=False)
    cfg = load_config(None, ["data.files=[x.txt]", f"model.arch={arch}",
                             *(MODERNBERT_OVERRIDES[1:] if arch == "modernbert" else [])])
    write_export(objective, model, tmp_path / "export", tokenizer, cfg, sample=batch["input_ids"])
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
    assert type(loaded) is type(model)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").get_vocab() == tokenizer.get_vocab()
    if name == "span":
        head = load_sbo_head(tmp_path / "export")
        with torch.no_grad():
            hidden = loaded.base_model(batch["input_ids"]).last_hidden_state[0]
            ours = objective.sbo_head.predict_span(backbone_of(model).encoder(model)(batch["input_ids"])
                                                   .last_hidden_state[0], 3, 6, backbone_of(model).decoder(model).weight)
            theirs = head.predict_span(hidden, 3, 6, loaded.get_input_embeddings().weight)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- fast path


def test_fast_path_fuses_qkv_for_roberta_and_leaves_modernbert_as_it_is(tokenizer):
    """RoBERTa's layers are BERT's: FusedEncoder computes what they do; ModernBERT already runs one Wqkv GEMM, so
    nothing is fused and its layers are untouched."""
    from pretrain.fast import FusedEncoder, apply_fast_path

    objective, model = build(tokenizer, "roberta", static_count=True)
    model.train()  # dropout 0: train mode changes nothing but the code path
    batch = packed_batch(tokenizer, objective, padded=True)
    eager = objective(model, batch)["loss"]
    keys = list(model.state_dict())
    apply_fast_path(model, objective, 32)
    assert isinstance(model.roberta.encoder, FusedEncoder) and list(model.state_dict()) == keys
    torch.testing.assert_close(objective(model, batch)["loss"], eager, rtol=1e-6, atol=1e-6)

    objective, model = build(tokenizer, "modernbert", static_count=True)
    layers = list(model.model.layers)
    assert objective.encoders(model) == []
    apply_fast_path(model, objective, 32)
    assert objective.static_shapes and list(model.model.layers) == layers
    assert not any(isinstance(m, FusedEncoder) for m in model.modules())


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("arch, name", [("roberta", "mlm"), ("modernbert", "span")])
def test_a_resumed_run_equals_the_uninterrupted_one(arch, name, tmp_path, monkeypatch, capsys):
    """Backprop, 3 steps, then resumed to 6 from the step-3 checkpoint: the same losses as 6 steps in one go."""
    base = ["decouple.mode=none", "decouple.chunks=1", "train.save_every=3", "train.eval_every=0",
            f"objective.name={name}", *(MODERNBERT_OVERRIDES if arch == "modernbert" else [f"model.arch={arch}"])]
    whole = worker_run(tmp_path / "whole", base, monkeypatch)
    worker_run(tmp_path / "resumed", [*base, "train.max_steps=3"], monkeypatch)
    capsys.readouterr()
    resumed = worker_run(tmp_path / "resumed", base, monkeypatch)
    assert "(step 3)" in capsys.readouterr().out  # it resumed rather than started over
    assert sorted(whole) == sorted(resumed) == list(range(1, 7))
    keys = ["loss", "mlm_loss", *(["sbo_loss"] if name == "span" else [])]
    for step in range(4, 7):
        for key in keys:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6), (step, key)
    assert whole[6]["loss"] < whole[1]["loss"]
    # the export command rebuilds the arch's model from the last checkpoint: the weights the run exported
    from safetensors.torch import load_file

    from pretrain.export import export_checkpoint

    again = load_file(str(export_checkpoint(tmp_path / "resumed", out=tmp_path / "again") / "model.safetensors"))
    exported = load_file(str(tmp_path / "resumed" / "export" / "model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


def test_modernbert_local_decoupling_distributed_equals_simulated(tmp_path, monkeypatch):
    """Two gloo processes, one chunk each (layers 0-1 | 2-3: a global and a local layer on either side), against the
    simulated runtime: the same losses per chunk at every step."""
    from distributed import torchrun

    args = [*MODERNBERT_OVERRIDES, "objective.name=span", "train.eval_every=0", "train.save_every=0"]
    sim = worker_run(tmp_path / "sim", args, monkeypatch)
    torchrun(2, WORKER, str(TESTS), str(tmp_path / "dist"), *args, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    dist = train_records(tmp_path / "dist")
    assert sorted(dist) == sorted(sim) == list(range(1, 7))
    for step in dist:
        for key in ("chunk0_mlm_loss", "chunk1_mlm_loss", "mlm_loss", "sbo_loss"):
            assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)
    # the stitched export (decoder untied from the embeddings chunk 0 owns) reloads with the training logits
    import json

    from pretrain.decouple.run import load_run
    from pretrain.hf_io import roundtrip_check

    export = tmp_path / "dist" / "export"
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is False
    assert (export / "sbo_head.safetensors").is_file()
    chunked, tok, _ = load_run(tmp_path / "dist")
    ids = tok(["the quick brown fox jumps over the lazy dog", "seven wizards box"], padding=True, return_tensors="pt")
    result = roundtrip_check(export, "AutoModelForMaskedLM", chunked.export_model(), ids["input_ids"],
                             ids["attention_mask"])
    assert result["class"] == "ModernBertForMaskedLM" and result["max_abs_err"] <= 1e-5


@pytest.mark.parametrize("arch", ["roberta", "modernbert"])
def test_synthetic_decoupling_trains_each_arch(arch, tmp_path, monkeypatch):
    """decouple.mode synthetic with a transformer-layer gradient module (the arch's layer, run with the chunk's
    context), simulated."""
    args = ["decouple.mode=synthetic", "decouple.synthetic.arch=layer", "train.eval_every=0", "train.save_every=0",
            "train.max_steps=3", *(MODERNBERT_OVERRIDES if arch == "modernbert" else [f"model.arch={arch}"])]
    records = worker_run(tmp_path / "run", args, monkeypatch)
    assert sorted(records) == [1, 2, 3] and all(r["mlm_loss"] > 0 for r in records.values())


@pytest.mark.parametrize("arch", ["roberta", "modernbert"])
def test_the_fast_path_step_traces_as_one_graph(tokenizer, arch):
    """The trainer's module (objective + model, static shapes) traces without a graph break: one graph to compile."""
    from pretrain.fast import apply_fast_path
    from pretrain.steps.backprop import PretrainModule

    objective, model = build(tokenizer, arch, "span")
    apply_fast_path(model, objective, 32)
    explained = torch._dynamo.explain(PretrainModule(model, objective))(packed_batch(tokenizer, objective, False))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_compiled_modernbert_step_keeps_losses_and_gradients(tokenizer, one_thread):
    """ModernBERT's step compiled (``compile_step``, inductor on the CPU) against eager, padded and packed."""
    import copy

    from pretrain.fast import apply_fast_path, compile_step
    from pretrain.steps.backprop import PretrainModule

    objective, model = build(tokenizer, "modernbert", static_count=True)
    fast_model, fast_objective = copy.deepcopy(model), copy.deepcopy(objective)
    apply_fast_path(fast_model, fast_objective, 32)
    fast_module = PretrainModule(fast_model, fast_objective)
    compile_step(fast_module)
    for padded in (True, False):
        batch = packed_batch(tokenizer, objective, padded)
        eager = objective(model, batch)
        fast = fast_module(batch)
        torch.testing.assert_close(fast["loss"], eager["loss"], rtol=1e-5, atol=1e-5)
        eager_grads, fast_grads = gradients(model, eager["loss"]), gradients(fast_model, fast["loss"])
        assert eager_grads.keys() == fast_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(fast_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_modernbert_chunk_outputs_and_the_stitched_layers_give_the_same_probe(tmp_path):
    """The probes' two routes (chunk by chunk; stem then layers through the layer runner) read the same ModernBERT
    features: the same accuracies at the layers a chunk ends at."""
    import json

    from decouple_worker import base_config
    from test_evaluation import synthetic_labelled

    from pretrain.config import config_from_dict

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(e) + "\n" for e in synthetic_labelled(400)))
    tree = base_config("unused")
    tree["model"].update(arch="modernbert", modernbert=MODERNBERT)
    tree["train"]["probe"] = {"data": str(labelled), "n_train": 200, "n_test": 100}
    chunked, stitched, model, _ = probes_both_routes(config_from_dict(tree), make_tokenizer())
    assert type(model.model).__name__ == "ModernBertForMaskedLM"
    assert set(chunked) == {"probe_acc_layer2", "probe_acc_layer4"}
    assert set(stitched) == {f"probe_acc_layer{n}" for n in (1, 2, 3, 4)}
    assert all(chunked[k] == stitched[k] for k in chunked)
