"""The fast path: static-shape gathers and fused encoders give HF's losses and gradients; the compiled step keeps
names, losses, gradients (under DDP too), resumption and export logits; decoupled chunks on the fast path give the
eager chunks' losses and gradients and train like them when compiled; the torch-version rules."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer, packed_examples, tiny_model_config, toy_corpus, train_records, write_tiny_config
from objectives import get_objective
from pretrain.config import ModelConfig
from objectives.base import encoder_attention_mask
from pretrain.fast import FusedEncoder, apply_fast_path, compile_step, fast_enabled, fuse_encoders

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import decouple_worker  # noqa: E402

OPTIONS = {"mlm": {"static_count": True}, "span": {"sbo_position_dim": 8}, "electra": {}}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def batch_with_a_short_block(tokenizer, objective):
    """Six full blocks of 32 and one of 20 (padded): fewer masked tokens than the static bound in that row."""
    examples = packed_examples(tokenizer, 7, length=32)
    examples[3] = packed_examples(tokenizer, 1, length=20, seed=3)[0]
    for i, e in enumerate(examples):
        e["index"] = i
    return objective.collate(examples)


def loss_and_gradients(run, batch, model, objective):
    """``run(batch)``'s output dict and the gradients its loss leaves on ``model``'s parameters and, prefixed
    ``objective.``, on ``objective``'s (cloned; both modules' gradients are cleared afterwards)."""
    out = run(batch)
    out["loss"].backward()
    named = [*model.named_parameters(), *((f"objective.{n}", p) for n, p in objective.named_parameters())]
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    model.zero_grad(set_to_none=True), objective.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("name", ["mlm", "span", "electra"])
def test_static_shapes_give_the_dynamic_losses_metrics_and_gradients(tokenizer, name):
    objective = get_objective(name, tokenizer, seed=0, **OPTIONS[name])
    if name == "span":
        objective.set_unigram_counts(torch.ones(len(tokenizer)))
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config()).eval()  # no dropout: both passes see the same network
    batch = batch_with_a_short_block(tokenizer, objective)
    static_objective = copy.deepcopy(objective)
    static_objective.static_shapes = True
    static_model = copy.deepcopy(model)

    dyn, dyn_grads = loss_and_gradients(lambda b: objective(model, b), batch, model, objective)
    stat, stat_grads = loss_and_gradients(lambda b: static_objective(static_model, b), batch, static_model,
                                          static_objective)
    assert set(dyn) == set(stat)
    for key in dyn:
        torch.testing.assert_close(stat[key].float(), dyn[key].float(), rtol=1e-6, atol=1e-6, msg=key)
    assert dyn_grads.keys() == stat_grads.keys() and dyn_grads
    for key in dyn_grads:
        torch.testing.assert_close(stat_grads[key], dyn_grads[key], rtol=1e-5, atol=1e-7, msg=key)


def test_static_index_pads_to_the_bound_and_marks_padding_invalid(tokenizer):
    objective = get_objective("electra", tokenizer, seed=0)
    objective.static_shapes = True
    batch = batch_with_a_short_block(tokenizer, objective)
    selected = batch["labels"] != -100
    index, valid = objective.gather_index(selected)
    bound = objective.max_selected(32)
    assert bound == round(0.15 * 32) and index.shape == valid.shape == (7 * bound,)
    assert int(valid.sum()) == int(selected.sum()) < 7 * bound  # the short block masks fewer
    assert torch.equal(index[valid], torch.nonzero(selected.flatten()).squeeze(1))
    _, _, _, aux = objective.loss_sums(objective.build_model(tiny_model_config()), batch)
    assert torch.equal(aux["disc_input_ids"][selected], aux["sampled"][aux["sampled_valid"]])
    assert torch.equal(aux["disc_input_ids"][~selected], batch["original_ids"][~selected])


def test_bernoulli_mlm_has_no_bound_and_stays_dynamic(tokenizer):
    objective = get_objective("mlm", tokenizer, seed=0)
    assert objective.max_selected(32) is None
    objective.static_shapes = True
    selected = torch.zeros(2, 8, dtype=torch.bool)
    selected[0, 3] = selected[1, 5] = True
    index, valid = objective.gather_index(selected)
    assert index.tolist() == [3, 13] and valid.all()


def full_batch(tokenizer, objective):
    examples = packed_examples(tokenizer, 6, length=32)
    for i, e in enumerate(examples):
        e["index"] = i
    return objective.collate(examples)


def test_the_collator_marks_padding_and_unpadded_batches_drop_the_mask(tokenizer):
    objective = get_objective("mlm", tokenizer, seed=0)
    full, short = full_batch(tokenizer, objective), batch_with_a_short_block(tokenizer, objective)
    assert full["padded"] is False and encoder_attention_mask(full) is None
    assert short["padded"] is True and encoder_attention_mask(short) is short["attention_mask"]
    assert (short["attention_mask"] == 0).any() and (full["attention_mask"] == 1).all()
    unmarked = {k: v for k, v in full.items() if k != "padded"}  # a batch built elsewhere keeps its mask
    assert encoder_attention_mask(unmarked) is unmarked["attention_mask"]


@pytest.mark.parametrize("name", ["mlm", "electra"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_encoder_computes_hf_layers_with_the_same_parameters(tokenizer, name, padded):
    """Train mode with dropout on both paths, the same seed: HF's layers and the fused ones draw the same dropout
    masks in the same order, so losses and every gradient agree up to float rounding (one GEMM instead of three)."""
    objective = get_objective(name, tokenizer, seed=0, **OPTIONS[name])
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config(hidden_dropout=0.1, attention_dropout=0.1))
    batch = (batch_with_a_short_block if padded else full_batch)(tokenizer, objective)
    fused = copy.deepcopy(model)
    fuse_encoders(objective.encoders(fused))
    assert all(isinstance(stack.encoder, FusedEncoder) for stack in objective.encoders(fused))
    assert list(fused.state_dict()) == list(model.state_dict())
    results = []
    for m in (model, fused):
        torch.manual_seed(1)  # the same dropout masks
        results.append(loss_and_gradients(lambda b: objective(m, b), batch, m, objective))
    (hf, hf_grads), (ours, our_grads) = results
    for key in ("loss", *objective.loss_parts):
        torch.testing.assert_close(ours[key], hf[key], rtol=1e-5, atol=1e-6, msg=key)
    assert our_grads.keys() == hf_grads.keys() and any(".attention.self.query." in n for n in hf_grads)
    for key in hf_grads:
        torch.testing.assert_close(our_grads[key], hf_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fused_encoder_refuses_decoders():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, is_decoder=True)
    with pytest.raises(ValueError, match="bidirectional self-attention encoders only"):
        FusedEncoder(BertModel(config).encoder)


def test_fast_defaults_to_cuda_only():
    assert fast_enabled(ModelConfig(), torch.device("cuda")) and not fast_enabled(ModelConfig(), torch.device("cpu"))
    assert fast_enabled(ModelConfig(fast=True), torch.device("cpu"))
    assert not fast_enabled(ModelConfig(fast=False), torch.device("cuda"))


def test_fast_path_needs_a_recent_torch(monkeypatch, tokenizer):
    """torch < 2.7 (no CUDA nonzero_static before 2.6): the CUDA default turns the fast path off; asking for it
    explicitly, or applying it, is an error naming the fix."""
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1+cu124"))
    assert not fast_enabled(ModelConfig(), torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.7.*found 2\.5\.1.*model\.fast: false"):
        fast_enabled(ModelConfig(fast=True), torch.device("cuda"))
    objective = get_objective("mlm", tokenizer, seed=0, **OPTIONS["mlm"])
    with pytest.raises(RuntimeError, match="upgrade torch"):
        apply_fast_path(objective.build_model(tiny_model_config()), objective, 32)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.0"))
    assert fast_enabled(ModelConfig(), torch.device("cuda"))
    assert fast_enabled(ModelConfig(fast=True), torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlm", "span", "electra"])
def test_compiled_step_keeps_names_losses_gradients_and_export_logits(tokenizer, name, tmp_path, one_thread):
    """The fast path end to end (static shapes, FusedEncoder, the trainer's module compiled as one graph) against
    the eager HF model, on a padded batch and on an unpadded one (no mask: a second graph). torch.compile on CPU
    (inductor + the system C++ compiler) takes about a minute per objective, hence slow."""
    from pretrain.hf_io import roundtrip_check
    from pretrain.steps.backprop import PretrainModule

    objective = get_objective(name, tokenizer, seed=0, **OPTIONS[name])
    if name == "span":
        objective.set_unigram_counts(torch.ones(len(tokenizer)))
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config())  # train mode, dropout 0: both paths see the same network
    fast_model, fast_objective = copy.deepcopy(model), copy.deepcopy(objective)
    apply_fast_path(fast_model, fast_objective, 32)
    fast_module = PretrainModule(fast_model, fast_objective)
    names = list(fast_module.state_dict())
    compile_step(fast_module)
    assert fast_module._compiled_call_impl is not None and list(fast_module.state_dict()) == names
    assert all(isinstance(stack.encoder, FusedEncoder) for stack in fast_objective.encoders(fast_model))
    assert list(fast_model.state_dict()) == list(model.state_dict())
    for batch in (batch_with_a_short_block(tokenizer, objective), full_batch(tokenizer, objective)):
        eager, eager_grads = loss_and_gradients(lambda b: objective(model, b), batch, model, objective)
        fast, fast_grads = loss_and_gradients(fast_module, batch, fast_model, fast_objective)
        for key in ("loss", *objective.loss_parts):
            torch.testing.assert_close(fast[key], eager[key], rtol=1e-5, atol=1e-5, msg=key)
        assert fast_grads.keys() == eager_grads.keys() and eager_grads
        for key in eager_grads:
            torch.testing.assert_close(fast_grads[key], eager_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    fast_model.eval()
    objective.export(fast_model, tmp_path / "export", tokenizer)
    for path, auto_class, reference in objective.export_targets(fast_model, tmp_path / "export"):
        assert roundtrip_check(path, auto_class, reference, batch["input_ids"], batch["attention_mask"],
                               atol=1e-4)["max_abs_err"] <= 1e-4


@pytest.mark.slow
def test_a_run_resumed_on_the_fast_path_follows_the_eager_run(tmp_path, one_thread):
    """``model.fast`` may change on resume (same parameters, same checkpoint): 3 eager steps, then 3 on the fast
    path from the step-3 checkpoint, against 6 eager steps (dropout 0, static masked count): the same losses to float
    rounding, and the fast run's export reloads with the same logits (``fit`` checks it in a fresh process)."""
    import yaml

    from pretrain.config import config_from_dict
    from pretrain.trainer import fit

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(toy_corpus(n_docs=200, seed=1)) + "\n")

    def run(name: str, steps: int, fast: bool):
        tree = yaml.safe_load(write_tiny_config(tmp_path / f"{name}.yaml", corpus, tmp_path / "cache",
                                                max_steps=steps, save_every=3).read_text())
        tree["output_dir"] = str(tmp_path / name)
        tree["model"].update(fast=fast, hidden_dropout=0.0, attention_dropout=0.0)
        tree["objective"] = {"name": "mlm", "mlm": {"static_count": True}}
        fit(config_from_dict(tree))
        return train_records(tmp_path / name)

    eager = run("eager", 6, False)
    run("resumed", 3, False)
    resumed = run("resumed", 6, True)
    assert sorted(resumed) == sorted(eager) == list(range(1, 7))
    for step in eager:
        assert resumed[step]["mlm_loss"] == pytest.approx(eager[step]["mlm_loss"], rel=1e-4), step
    assert (tmp_path / "resumed" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_compiled_ddp_step_accumulates_the_eager_gradients(tmp_path):
    """Two gloo processes, two micro-batches per window (DDP's no_sync on the first), ELECTRA (two encoders, the
    sampling in the graph): the compiled DDP wrapper (``compile_step`` after accelerate's prepare) gives the eager
    run's all-reduced gradients."""
    from distributed import torchrun

    tests = Path(__file__).parent
    for mode in ("eager", "fast"):
        torchrun(2, str(tests / "dist" / "grad_worker.py"), "electra", str(tmp_path / f"{mode}.pt"), str(tests),
                 mode, "2", timeout=900)
    eager, fast = torch.load(tmp_path / "eager.pt"), torch.load(tmp_path / "fast.pt")
    assert fast["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert fast["grads"].keys() == eager["grads"].keys() and len(eager["grads"]) > 10
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(fast["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def decoupled_tree(output_dir, objective: str, mode: str, fast=None, dropout=0.0) -> dict:
    """Two chunks of a tiny 4-layer model (an extra layer in each auxiliary head in local mode), static counts."""
    tree = decouple_worker.base_config(str(output_dir))
    tree["model"].update(fast=fast, hidden_dropout=dropout, attention_dropout=dropout)
    tree["objective"] = {"name": objective, **({"mlm": {"static_count": True}} if objective == "mlm" else {})}
    tree["decouple"] = {"mode": mode, "chunks": 2, **({"aux_head": "layer"} if mode == "local" else {})}
    return tree


@pytest.mark.parametrize("objective, mode", [("mlm", "local"), ("span", "local"), ("electra", "local"),
                                             ("span", "synthetic")])
def test_fast_chunks_give_the_eager_chunks_losses_and_gradients(tokenizer, objective, mode):
    """The decoupled fast path before compilation (static-shape heads, fused layers in the chunks, the auxiliary
    heads' extra layer and ELECTRA's generator), dropout on with the same seed: each chunk's loss and every
    parameter's gradient equal the eager chunks', and so does the gradient a synthetic-mode chunk leaves on its
    input; names are unchanged."""
    from pretrain.config import config_from_dict
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.fast import apply_fast_path_to_chunks

    torch.manual_seed(0)
    cfg = config_from_dict(decoupled_tree("unused", objective, mode, dropout=0.1))
    model, collator = build_chunked_model(cfg, tokenizer, torch.ones(len(tokenizer)))
    fast = copy.deepcopy(model)
    apply_fast_path_to_chunks(fast, 32, compile=False)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(chunk.fused for chunk in fast.chunks) and fast.objective.static_shapes
    synthetic = mode == "synthetic"

    def run(chunked, batch):
        """Losses of the chunks; gradients of the parameters and of chunk 1's input (synthetic mode: chunk 0
        backpropagates a fixed output gradient)."""
        torch.manual_seed(1)
        normalizers = window_normalizers(collator, [batch], "cpu")
        outputs, losses = chunked.chunks[0](batch, None, normalizers, boundary_grads=synthetic)
        if synthetic:
            # of the size of a token-normalised loss's gradient (~1 / the masked count), like a synthetic one
            probe = 1e-2 * torch.randn(outputs["hidden"].shape, generator=torch.Generator().manual_seed(2))
            outputs["hidden"].backward(probe)
            outputs = {**outputs, "hidden": outputs["hidden"].detach().requires_grad_()}
        else:
            losses["loss"].backward()
        _, top = chunked.chunks[1](batch, outputs, normalizers, boundary_grads=synthetic)
        top["loss"].backward()
        grads = {n: p.grad.clone() for n, p in chunked.named_parameters() if p.grad is not None}
        if synthetic:
            grads["chunk1_input"] = outputs["hidden"].grad
        chunked.zero_grad(set_to_none=True)
        return [losses.get("loss"), top["loss"]], grads

    for batch in (batch_with_a_short_block(tokenizer, collator), full_batch(tokenizer, collator)):
        (eager_losses, eager_grads), (fast_losses, fast_grads) = run(model, batch), run(fast, batch)
        for ours, theirs in zip(fast_losses, eager_losses):
            if theirs is not None:
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert fast_grads.keys() == eager_grads.keys() and any(".attention.self.query." in n for n in eager_grads)
        for key in eager_grads:
            torch.testing.assert_close(fast_grads[key], eager_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("objective, mode", [("electra", "local"), ("span", "synthetic")])
def test_a_decoupled_run_on_the_fast_path_follows_the_eager_run(tmp_path, objective, mode):
    """``fit`` with decouple.mode local/synthetic and model.fast on CPU (each chunk compiled; train, evaluation,
    checkpoints, the stitched export), in one process and as two gloo processes, against the same run eager in one
    process, dropout 0: the same per-step losses and final weights to float rounding."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from distributed import torchrun
    from pretrain.config import config_from_dict
    from test_decouple import fit_in_process

    for fast in (False, True):
        counters.clear()
        fit_in_process(config_from_dict(decoupled_tree(tmp_path / str(fast), objective, mode, fast=fast)))
    # both chunks compiled, for training and for evaluation, each without a graph break
    assert counters["stats"]["unique_graphs"] >= 4 and not counters["graph_break"]
    tests = Path(__file__).parent
    overrides = [f"objective.name={objective}", f"decouple.mode={mode}", "model.fast=true"]
    if mode == "local":
        overrides.append("decouple.aux_head=layer")
    torchrun(2, str(tests / "dist" / "decouple_worker.py"), str(tests), str(tmp_path / "dist"), *overrides,
             timeout=900, env={"SKIP_ROUNDTRIP": "1"})
    eager = train_records(tmp_path / "False")
    assert sorted(eager) == list(range(1, 7))
    for run in ("True", "dist"):
        records = train_records(tmp_path / run)
        assert sorted(records) == sorted(eager), run
        for step in eager:
            assert records[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), (run, step)
        for k in range(2):
            final = [load_file(str(tmp_path / name / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
                     for name in ("False", run)]
            assert final[0].keys() == final[1].keys()
            for name in final[0]:
                torch.testing.assert_close(final[1][name], final[0][name], rtol=1e-3, atol=1e-5, msg=(run, name))
        assert (tmp_path / run / "export").is_dir()


@pytest.mark.parametrize("fused", [True, None])
def test_step_if_finite_skips_a_non_finite_update_entirely(fused):
    """Fused AdamW decides on the device (found_inf); the foreach one on the host. A skipped step leaves weights,
    moments and the step count untouched; a finite one is an ordinary AdamW step."""
    from pretrain.optim import step_if_finite

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    reference = copy.deepcopy(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
    for m in (layer, reference):
        m(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert step_if_finite(opt, torch.tensor(1.0)) == 0.0
    ref_opt.step()
    for p, q in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = copy.deepcopy(layer.state_dict())
    state = copy.deepcopy(opt.state_dict()["state"])
    assert step_if_finite(opt, torch.tensor(float("nan"))) == 1.0
    assert step_if_finite(opt, torch.tensor(float("inf"))) == 1.0
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    for key, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, state[key][name]), (key, name)
    assert getattr(opt, "found_inf", None) is None


def test_a_failing_compiler_names_model_fast_false(tokenizer, monkeypatch):
    """The compiler runs lazily, inside the first step: its failure must point at the way out (issue 17)."""
    import pretrain.steps.backprop
    from pretrain.config import config_from_dict
    from pretrain.steps.backprop import BackpropStep

    def broken_backend(graph, example_inputs):
        raise OSError("no C compiler found")

    monkeypatch.setattr(pretrain.steps.backprop, "compile_step",
                        lambda module: module.compile(backend=broken_backend, dynamic=False))
    cfg = config_from_dict({"data": {"files": ["x.txt"], "block_size": 32, "num_workers": 0},
                            "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                                      "max_position_embeddings": 64, "fast": True},
                            "objective": {"name": "mlm", "mlm": {"static_count": True}},
                            "train": {"micro_batch_size": 2, "device": "cpu"}, "log": {"tensorboard": False}})
    objective = get_objective("mlm", tokenizer, seed=0, static_count=True)
    runner = BackpropStep(cfg)
    runner.build(objective, objective, None, tokenizer)
    batch = objective.collate([{"input_ids": [2, *range(10, 40), 3], "index": i} for i in range(2)])
    with pytest.raises(RuntimeError, match=r"compiling the fast path failed \(OSError: no C compiler found\); "
                                           r"set model.fast: false"):
        runner.train_step([batch], 1e-3, 0)
    torch._dynamo.reset()
