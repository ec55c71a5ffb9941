"""decouple.mode=synthetic (DESIGN.md §4): the brackets (an oracle M_k is backprop, a zero M_k is the frozen
control; S = 0 with λ = 1 is backprop), M_k learns, distributed == simulated, exact resume, export, fp32 SG math
under bf16 autocast, config checks."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import torchrun
from helpers import assert_config_rejected, make_tokenizer, packed_examples, train_records
from pretrain.config import config_from_dict

TESTS = Path(__file__).parent
WORKER = str(TESTS / "dist" / "decouple_worker.py")
sys.path.insert(0, str(TESTS / "dist"))
import decouple_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(weight_decay=0.01, chunks=2, **synthetic):
    tree = decouple_worker.base_config("unused")
    tree["decouple"] = {"mode": "synthetic", "chunks": chunks, "synthetic": synthetic}
    tree["train"].update(weight_decay=weight_decay, max_steps=100, save_every=0)
    return config_from_dict(tree)


def steps_of_batches(collator, tok, steps=3, n_micro=2, size=4):
    """``steps`` optimizer steps of ``n_micro`` micro-batches each (distinct blocks)."""
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, steps * n_micro * size, length=32))]
    micro = [collator.collate(examples[i * size:(i + 1) * size]) for i in range(steps * n_micro)]
    return [micro[s * n_micro:(s + 1) * n_micro] for s in range(steps)]


def build(cfg, tok):
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.layout import Layout

    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    return model, collator, Pipeline(model, cfg, Layout("simulated", cfg.decouple.chunks, 1, 0), torch.device("cpu"))


def end_to_end_gradients(model, micro, norms):
    """Backprop through every chunk; per micro-batch the true dL/dh of each boundary (each chunk's input is a leaf
    fed the lower chunk's output, and the lower chunk's gradient is accumulated into the parameters: callers zero)."""
    deltas = []
    for batch in micro:
        inputs, leaves = None, []
        for chunk in model.chunks:
            if inputs is not None:
                leaves.append(inputs["hidden"].detach().requires_grad_())
                inputs = {**inputs, "hidden": leaves[-1]}
            inputs, out = chunk(batch, inputs, norms, boundary_grads=True)
        out["loss"].backward()
        deltas.append([leaf.grad.detach() for leaf in leaves])
    return deltas


def backprop_reference(cfg, tok, steps):
    """Ordinary backprop on the same chunked model: the loss's gradient flows through every boundary; each chunk
    clips its own gradients and steps its own AdamW (as the runtime does). Returns (losses, parameters)."""
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.optim import build_optimizer

    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    opts = [build_optimizer(torch.nn.ParameterList(model.chunk_parameters(k)), cfg.train, "cpu")
            for k in range(model.num_chunks)]
    losses = []
    for micro in steps(collator):
        norms = window_normalizers(collator, micro, "cpu")
        for batch in micro:
            inputs = None
            for chunk in model.chunks:
                inputs, out = chunk(batch, inputs, norms, boundary_grads=True)
            out["loss"].backward()
            losses.append(float(out["loss"].detach()))
        for k, opt in enumerate(opts):
            torch.nn.utils.clip_grad_norm_(model.chunk_parameters(k), cfg.train.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in model.parameters() if p not in set(model.synthetic.parameters())]


def pipeline_losses(pipeline):
    """Record the last chunk's per-micro-batch loss as the runtime computes it."""
    stage, seen = pipeline.stages[-1], []
    add = stage.tracker.add
    stage.tracker.add = lambda out: (seen.append(float(out["loss"].detach())) if "loss" in out else None, add(out))
    return seen


class Oracle(torch.nn.Module):
    """An M_k that returns the true (scaled) gradient of the h it is given, looked up among ``known`` (h, δ·c)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # so that the stage's AdamW has a parameter
        self.known: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden, labels, mask):
        for h, target in self.known:
            if torch.equal(h, hidden):
                return target + 0 * self.unused
        raise AssertionError("the oracle was asked about an unknown h")


class Zero(Oracle):
    def forward(self, hidden, labels, mask):
        return torch.zeros_like(hidden) + 0 * self.unused


def install(stage, module):
    stage.module = module
    stage.sg_optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)


# --------------------------------------------------------------------------- brackets


def test_oracle_synthetic_gradient_reproduces_backprop():
    """M_0 returns the true gradient (computed with the current parameters before each step): the lower chunk
    updates from exactly what backprop would give it, with staleness 1 and no mixing."""
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    cfg = make_cfg(staleness=1, target_scale="count")  # the oracle answers δ·count
    ref_losses, ref_params = backprop_reference(cfg, tok, lambda c: steps_of_batches(c, tok))
    model, collator, pipeline = build(cfg, tok)
    oracle = Oracle()
    install(pipeline.stages[0], oracle)
    losses = pipeline_losses(pipeline)
    metrics = []
    for step, micro in enumerate(steps_of_batches(collator, tok)):
        norms = window_normalizers(collator, micro, "cpu")
        deltas = end_to_end_gradients(model, micro, norms)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # M_0 also meets last step's h again when its true gradient arrives (S = 1)
            for batch, (delta,) in zip(micro, deltas):
                h, _ = model.chunks[0](batch, None, norms)
                oracle.known.append((h["hidden"], delta * norms["n_masked"]))
        pipeline.train_step(micro, norms, cfg.train.lr, step)
        metrics.append(pipeline.gather_metrics())
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for m in metrics:  # the prediction used is the true gradient: cosine 1 overall and at the context positions
        assert m["chunk0_sg_cos"] == pytest.approx(1.0, abs=1e-5)
        assert m["chunk0_sg_cos_context"] == pytest.approx(1.0, abs=1e-5)
    got = [p for p in model.parameters() if p not in set(model.synthetic.parameters())]
    assert len(got) == len(ref_params) > 10
    for a, b in zip(ref_params, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_staleness_zero_with_full_mixing_is_backprop():
    """S = 0, λ = 1: every chunk waits for its true gradient and uses it alone: backprop, bit for bit."""
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    cfg = make_cfg(chunks=3, staleness=0, mix=1.0)
    ref_losses, ref_params = backprop_reference(cfg, tok, lambda c: steps_of_batches(c, tok))
    model, collator, pipeline = build(cfg, tok)
    losses = pipeline_losses(pipeline)
    for step, micro in enumerate(steps_of_batches(collator, tok)):
        pipeline.train_step(micro, window_normalizers(collator, micro, "cpu"), cfg.train.lr, step)
    assert losses == ref_losses
    got = [p for p in model.parameters() if p not in set(model.synthetic.parameters())]
    assert len(got) == len(ref_params) and all(torch.equal(a, b) for a, b in zip(ref_params, got))
    metrics = pipeline.gather_metrics()  # M_k trained on the true gradients all along
    assert metrics["n_sg0"] == metrics["n_sg1"] == 6


def test_zero_synthetic_gradient_reproduces_the_frozen_lower_chunk_control():
    """M_0 ≡ 0: chunk 0 never moves and chunk 1 trains exactly like ``freeze_lower`` (weight decay 0: AdamW's
    decoupled decay would shrink chunk 0's weights even with a zero gradient)."""
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    tree = decouple_worker.base_config("unused")
    tree["decouple"] = {"mode": "local", "chunks": 2, "freeze_lower": True}
    tree["train"]["weight_decay"] = 0.0
    frozen_cfg = config_from_dict(tree)
    torch.manual_seed(0)
    frozen, collator = build_chunked_model(frozen_cfg, tok)
    frozen_pipe = Pipeline(frozen, frozen_cfg, Layout("simulated", 2, 1, 0), torch.device("cpu"))
    frozen_losses = pipeline_losses(frozen_pipe)
    cfg = make_cfg(weight_decay=0.0)
    model, _, pipeline = build(cfg, tok)
    install(pipeline.stages[0], Zero())
    losses = pipeline_losses(pipeline)
    before = [p.detach().clone() for p in model.chunk_parameters(0)]
    for step, micro in enumerate(steps_of_batches(collator, tok)):
        norms = window_normalizers(collator, micro, "cpu")
        frozen_pipe.train_step(micro, norms, cfg.train.lr)
        pipeline.train_step(micro, norms, cfg.train.lr, step)
    assert losses == frozen_losses and len(losses) == 6
    assert all(torch.equal(a, b) for a, b in zip(before, model.chunk_parameters(0)))
    for a, b in zip(frozen.chunk_parameters(1), model.chunk_parameters(1)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- M_k learns


def fit_fixed_batch(arch, context, steps=40):
    """Chunks frozen (lr 0), one micro-batch repeated with S = 0: M_0 regresses a fixed target (lr 3e-3)."""
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    cfg = make_cfg(arch=arch, context=context, staleness=0, lr=3e-3)
    _, collator, pipeline = build(cfg, tok)
    micro = steps_of_batches(collator, tok, steps=1, n_micro=1)[0]
    norms = window_normalizers(collator, micro, "cpu")
    history = []
    for step in range(steps):
        pipeline.train_step(micro, norms, 0.0, step)
        history.append(pipeline.gather_metrics())
    return [m["chunk0_sg_loss"] for m in history], [m["chunk0_sg_cos"] for m in history]


@pytest.mark.parametrize("arch", ["linear", "mlp", "layer"])
def test_synthetic_gradient_loss_decreases_on_a_fixed_batch(arch):
    """The zero-initialised output makes the first loss the target's energy (no-gradient prediction); the loss
    must fall at every step and M_0 must explain more than half of that energy (R² > 0.5), its prediction then
    pointing along δ (cosine > 0.5; the prediction actually used is the one before each update, so cos[0] = 0)."""
    sg, cos = fit_fixed_batch(arch, "labels")
    assert all(b < a for a, b in zip(sg, sg[1:])), sg
    assert sg[-1] < 0.5 * sg[0], (sg[0], sg[-1])
    assert cos[0] == 0.0 and cos[-1] > 0.5


def test_label_conditioning_fits_the_true_gradient_faster_than_h_alone():
    """cDNI: the MLM gradient at a masked position depends on its target id, which h does not determine."""
    with_labels, without = fit_fixed_batch("mlp", "labels"), fit_fixed_batch("mlp", "none")
    assert with_labels[0][-1] < without[0][-1] and with_labels[1][-1] > without[1][-1]


def test_synthetic_module_math_is_fp32_under_bf16_autocast():
    """Under bf16 autocast the prediction is fp32 [B, L, H] and M_k's matmuls run in fp32. bf16 matmuls crash this
    CPU (SIGILL in oneDNN), so instead of running the chunk in bf16 a dispatch mode inspects every matmul *before*
    it executes and fails on a bf16 one: the check cannot take the test process down."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.decouple.run import build_chunked_model

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    class NoBf16Matmul(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
                assert dtypes == {torch.float32}, f"{func} would run in {dtypes}"
                NoBf16Matmul.seen += 1
            return func(*args, **(kwargs or {}))

    tok = make_tokenizer()
    cfg = make_cfg(arch="layer")
    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    module = model.synthetic[0]
    torch.nn.init.normal_(module.out.weight, std=0.02)  # a non-zero prediction
    batch = steps_of_batches(collator, tok, steps=1, n_micro=1)[0][0]
    h = torch.randn(*batch["input_ids"].shape, 32).to(torch.bfloat16)
    # the [B, L] mask as such (no `padded` flag): M_k's attention gets HF's mask, not None
    mask = model.chunks[1].attention_mask(h.float(), {"attention_mask": batch["attention_mask"]})
    with NoBf16Matmul():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the chunk's forward context
            out = module(h, batch["labels"], mask)
        out.pow(2).sum().backward()  # outside autocast, as in the runtime (inside, backward matmuls would be bf16)
    assert out.dtype == torch.float32 and out.shape == h.shape and out.abs().sum() > 0
    assert NoBf16Matmul.seen >= 8  # the layer's q/k/v/attention/output/FFN and the projections were inspected
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.out.parameters())


def test_token_cosine_is_one_for_collapsed_outputs_and_ignores_padding():
    from pretrain.decouple.synthetic import token_cosine

    gen = torch.Generator().manual_seed(0)
    same = torch.randn(1, 1, 64, generator=gen).expand(3, 8, 64)
    assert token_cosine(same, None) == pytest.approx(1.0)
    eye = torch.eye(8).repeat(2, 1, 1)  # 8 orthogonal tokens: only the 8 self-pairs of 64 count
    assert token_cosine(eye, None) == pytest.approx(1 / 8)
    mask = torch.ones(2, 8)
    mask[:, 4:] = 0
    padded = eye.clone()
    padded[:, 4:] = padded[:, 0:1]  # padding that would look collapsed with the first token
    assert token_cosine(padded, mask) == pytest.approx(1 / 4)
    # random directions: 1/L in expectation (off-diagonal cosines average 0; s.d. of the result here ≈ 0.001)
    rand = torch.randn(4, 128, 64, generator=gen)
    assert token_cosine(rand, None) == pytest.approx(1 / 128, abs=0.005)


def test_center_removes_the_shared_part_at_target_positions_only():
    from objectives.base import IGNORE_INDEX
    from pretrain.decouple.synthetic import center_on_targets

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 10, 8, generator=gen) + 5.0  # a large shared component
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, [1, 4, 7]] = 11
    labels[1, [0, 9]] = 12  # block 2 has no target: left as it is
    out = center_on_targets(grad, labels)
    targets = labels != IGNORE_INDEX
    assert torch.equal(out[~targets], grad[~targets])
    for b in range(2):
        picked = out[b][targets[b]]
        assert picked.mean(0).abs().max() < 1e-5
        # what is left is the block's token-specific part
        torch.testing.assert_close(picked, grad[b][targets[b]] - grad[b][targets[b]].mean(0))


def test_centered_prediction_is_what_the_chunk_backpropagates():
    """synthetic.center: the gradient entering chunk 0's output is M_0's prediction, centred per block over the
    masked positions (an M_0 returning a constant vector then drives no update at all)."""
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    cfg = make_cfg(center=True, staleness=1)
    model, collator, pipeline = build(cfg, tok)

    class Constant(Oracle):
        def forward(self, hidden, labels, mask):
            return torch.ones_like(hidden) * (labels != -100).unsqueeze(-1) + 0 * self.unused

    install(pipeline.stages[0], Constant())
    micro = steps_of_batches(collator, tok, steps=1, n_micro=1)[0]
    before = [p.detach().clone() for p in model.chunk_parameters(0)]
    pipeline.train_step(micro, window_normalizers(collator, micro, "cpu"), cfg.train.lr, 0)
    decayed = [b * (1 - cfg.train.lr * cfg.train.weight_decay) if b.dim() > 1 else b for b in before]
    for b, a in zip(decayed, model.chunk_parameters(0)):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-7)


def test_collapse_penalty_spreads_the_lower_chunks_outputs():
    """With M_0 ≡ 0, collapse_penalty β is chunk 0's only signal: its gradient is that of β·token_cos(h) (checked
    against autograd on the same forward), and token_cos falls step after step on a fixed batch."""
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.decouple.synthetic import token_cosine

    tok = make_tokenizer()
    cfg = make_cfg(collapse_penalty=1.0, staleness=0, weight_decay=0.0)
    model, collator, pipeline = build(cfg, tok)
    install(pipeline.stages[0], Zero())
    micro = steps_of_batches(collator, tok, steps=1, n_micro=1)[0]
    norms = window_normalizers(collator, micro, "cpu")
    chunk0, params = model.chunks[0], model.chunk_parameters(0)
    outputs, _ = chunk0(micro[0], None, norms, boundary_grads=True)  # dropout 0: the stage's forward is the same
    expected = torch.autograd.grad(token_cosine(outputs["hidden"], micro[0]["attention_mask"]), params,
                                   allow_unused=True)
    stage = pipeline.stages[0]
    stage.forward_backward(micro[0], None, norms, pipeline.autocast)
    stage.release_graphs()
    for g, p in zip(expected, params):
        if g is None:
            assert p.grad is None or p.grad.abs().max() == 0
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    for p in params:
        p.grad = None
    stage.pending.clear()
    spread = []
    for step in range(8):
        pipeline.train_step(micro, norms, 1e-3, step)
        spread.append(pipeline.gather_metrics()["chunk0_token_cos"])
    assert all(b < a for a, b in zip(spread, spread[1:])), spread


# --------------------------------------------------------------------------- runs


KEYS = ("mlm_loss", "mlm_acc", "chunk0_sg_loss", "chunk0_sg_cos", "chunk0_token_cos")


@pytest.fixture
def in_process(monkeypatch):
    """The torchrun worker's run (``fit`` on in-memory blocks) in this process, without the fresh-process
    export check: ``in_process(output_dir, overrides)``."""
    import pretrain.export

    monkeypatch.setattr(pretrain.export, "roundtrip_check", decouple_worker.skip_roundtrip)
    monkeypatch.delenv("SKIP_ROUNDTRIP", raising=False)
    return lambda run, args: decouple_worker.main(str(run), list(args))


@pytest.mark.parametrize("options", [["decouple.synthetic.staleness=0"],
                                     ["decouple.synthetic.staleness=2", "decouple.synthetic.mix=0.5",
                                      "decouple.synthetic.warmup_steps=1"]], ids=["S0", "S2-mix-warmup"])
def test_distributed_synthetic_equals_simulated(tmp_path, options, in_process):
    """2 gloo processes (activations up, true gradients down, asynchronously) and one process agree step by step."""
    args = ["decouple.mode=synthetic", *options]
    torchrun(2, WORKER, str(TESTS), str(tmp_path / "dist"), *args, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    in_process(tmp_path / "sim", args)
    dist, sim = train_records(tmp_path / "dist"), train_records(tmp_path / "sim")
    assert sorted(dist) == sorted(sim) == list(range(1, 7))
    assert sum("chunk0_sg_cos" in r for r in dist.values()) >= 3
    for step in dist:
        for key in KEYS:
            if key in sim[step] or key in dist[step]:
                assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-7), (step, key)
    for k in range(2):
        for name in ("model.safetensors",) + (("synthetic.safetensors",) if k == 0 else ()):
            a = load_file(str(tmp_path / "dist" / "checkpoints" / "step-6" / f"chunk{k}" / name))
            b = load_file(str(tmp_path / "sim" / "checkpoints" / "step-6" / f"chunk{k}" / name))
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_synthetic_run_resumes_exactly_and_exports_the_modules_beside(tmp_path, in_process, capsys):
    """A run resumed from its step-4 checkpoint (M_0 and its AdamW restored) ends bit-identical to the full run;
    the export holds the stitched BERT only, the SG modules go to ``synthetic_gradients.safetensors``."""
    import yaml

    from pretrain.decouple.synthetic import SYNTHETIC_EXPORT_FILE

    args = ["decouple.mode=synthetic", "decouple.synthetic.staleness=1", "decouple.synthetic.mix=0.5"]
    full = tmp_path / "full"
    in_process(full, args)
    run = tmp_path / "resumed"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "export")
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    in_process(run, args)
    assert "(step 4)" in capsys.readouterr().out.split("resumed from")[1]
    ref, got = train_records(full), train_records(run)
    for step in (5, 6):
        assert {k: got[step].get(k) for k in KEYS} == {k: ref[step].get(k) for k in KEYS}, step
    for k, names in ((0, ("model.safetensors", "synthetic.safetensors")), (1, ("model.safetensors",))):
        for name in names:
            a = load_file(str(full / "checkpoints" / "step-6" / f"chunk{k}" / name))
            b = load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / name))
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), (k, name)
    weights = load_file(str(run / "export" / "model.safetensors"))
    assert not any("synthetic" in k or "aux" in k for k in weights)
    modules = load_file(str(run / "export" / SYNTHETIC_EXPORT_FILE))
    saved = load_file(str(run / "checkpoints" / "step-6" / "chunk0" / "synthetic.safetensors"))
    assert modules.keys() == {f"synthetic.0.{k}" for k in saved}
    assert all(torch.equal(modules[f"synthetic.0.{k}"], v) for k, v in saved.items())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("tree, message", [
    ({"decouple": {"mode": "local", "chunks": 2, "synthetic": {"mix": 0.5}}},
     "decouple.synthetic.mix is set but decouple.mode=local"),
    ({"decouple": {"mode": "synthetic", "chunks": 1}}, "synthetic needs decouple.chunks >= 2"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"mix": 1.5}}}, "mix .* must be in \\[0, 1\\]"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"staleness": -1}}}, "staleness must be >= 0"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"lr": 0}}}, "synthetic.lr must be > 0"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"arch": "mlpp"}}}, "did you mean 'mlp'"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "aux_head": "layer"}}, "aux_head applies to mode local"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"collapse_penalty": -1}}},
     "collapse_penalty must be >= 0"),
    ({"decouple": {"mode": "synthetic", "chunks": 2, "synthetic": {"centre": True}}},
     "did you mean 'decouple.synthetic.center'"),
])
def test_bad_synthetic_configs_fail_naming_the_fix(tree, message):
    assert_config_rejected(tree, message)


def test_electra_with_synthetic_gradients_is_refused_naming_local_mode():
    """Refused at config time, before any data is prepared (issue 17), and again where the model is cut."""
    from pretrain.decouple.run import build_chunked_model

    tree = decouple_worker.base_config("unused")
    tree["objective"] = {"name": "electra"}
    tree["decouple"] = {"mode": "synthetic", "chunks": 2}
    assert_config_rejected(tree, "use decouple.mode=local for electra")
    cfg = config_from_dict({**tree, "decouple": {"mode": "local", "chunks": 2}})
    cfg.decouple.mode = "synthetic"  # past the config's check
    with pytest.raises(NotImplementedError, match="use decouple.mode=local for electra"):
        build_chunked_model(cfg, make_tokenizer())


def test_decoupled_sg_yaml_parses():
    from pretrain.config import load_config

    cfg = load_config(TESTS.parent / "configs" / "decoupled-sg.yaml")
    assert cfg.decouple.mode == "synthetic" and cfg.decouple.chunks == 2
