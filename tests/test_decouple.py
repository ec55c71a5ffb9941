"""decouple.mode=local (DESIGN.md §4): chunk isolation, K=1 == backprop, simulated == distributed (real gloo
processes), exact resume after SIGKILL, the stitched export, the frozen control, data-parallel pipelines (D = 2 ×
K = 2 processes == one pipeline of twice the micro-batch), config checks. The runs are repeated with overlapping
local updates (``decouple.overlap=1``; its own invariants: tests/test_decouple_overlap.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import free_port, torchrun
from helpers import assert_config_rejected, make_tokenizer, packed_examples, train_records
from pretrain.config import DecoupleConfig, config_from_dict

TESTS = Path(__file__).parent
WORKER = str(TESTS / "dist" / "decouple_worker.py")
sys.path.insert(0, str(TESTS / "dist"))
import decouple_worker  # noqa: E402


def make_cfg(output_dir="unused", objective="mlm", chunks=2, aux_head="decoder", dropout=0.0, **train):
    tree = decouple_worker.base_config(str(output_dir))
    tree["objective"] = {"name": objective}
    tree["decouple"].update(chunks=chunks, aux_head=aux_head)
    tree["model"].update(hidden_dropout=dropout, attention_dropout=dropout)
    tree["train"].update(train)
    return config_from_dict(tree)


def micro_batches(collator, tok, n_micro=2, size=4):
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, n_micro * size, length=32))]
    return [collator.collate(examples[i * size:(i + 1) * size]) for i in range(n_micro)]


# --------------------------------------------------------------------------- chunking and config


def test_auto_boundaries_balance_layers_and_explicit_ones_are_used():
    from pretrain.decouple.chunks import layer_ranges

    assert layer_ranges(4, 1) == [(0, 4)]
    assert layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert layer_ranges(5, 2) == [(0, 2), (2, 5)]  # the remainder goes up: chunk 0 also embeds
    assert layer_ranges(6, 4) == [(0, 1), (1, 2), (2, 4), (4, 6)]
    assert layer_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layer_ranges(4, 2, [1]) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError):
        layer_ranges(4, 2, [4])


@pytest.mark.parametrize("tree, message", [
    ({"decouple": {"mode": "local", "chunks": 0}}, "decouple.chunks must be >= 1"),
    ({"decouple": {"mode": "local", "chunks": 5}}, "exceeds model.num_layers"),
    ({"decouple": {"mode": "local", "chunks": 2, "boundaries": [1, 2]}}, "needs chunks - 1 = 1"),
    ({"decouple": {"mode": "local", "chunks": 3, "boundaries": [2, 1]}}, "strictly increasing"),
    ({"decouple": {"mode": "local", "chunks": 2, "boundaries": [0]}}, "strictly increasing"),
    ({"decouple": {"mode": "local", "chunks": 2, "boundaries": [4]}}, "must be < model.num_layers"),
    ({"decouple": {"mode": "local", "chunks": 2, "boundaries": "half"}}, "'auto' or a list"),
    ({"decouple": {"mode": "none", "chunks": 2}}, "needs decouple.mode local"),
    ({"decouple": {"mode": "local", "chunks": 1, "freeze_lower": True}}, "freeze_lower needs"),
    ({"decouple": {"mode": "local", "chunks": 2, "aux_head": "layers"}}, "did you mean 'layer'"),
])
def test_bad_decouple_configs_fail_naming_the_key(tree, message):
    assert_config_rejected(tree, message)


def test_decoupled_local_yaml_parses():
    from pretrain.config import load_config

    cfg = load_config(TESTS.parent / "configs" / "decoupled-local.yaml")
    assert cfg.decouple.mode == "local" and cfg.decouple.chunks == 2
    assert DecoupleConfig().mode == "none"


# --------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("objective, aux_head", [("mlm", "decoder"), ("mlm", "layer"), ("span", "decoder"),
                                                 ("electra", "layer")])
def test_scaling_one_chunks_loss_leaves_every_other_chunks_gradients_bit_identical(objective, aux_head):
    """Invariant (1) of DESIGN.md §4, with dropout on: no gradient crosses a boundary, and nothing a chunk computes
    (its outputs, ELECTRA's samples) depends on the loss scale of another chunk."""
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = make_cfg(objective=objective, chunks=3, aux_head=aux_head, dropout=0.1)
    model, collator = build_chunked_model(cfg, tok)
    batches = micro_batches(collator, tok)
    norms = window_normalizers(collator, batches, "cpu")

    def grads(scales):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in every call
        for batch in batches:
            inputs = None
            for chunk, scale in zip(model.chunks, scales):
                inputs, out = chunk(batch, inputs, norms)
                (scale * out["loss"]).backward()
        return [[p.grad.clone() for p in model.chunk_parameters(k)] for k in range(model.num_chunks)]

    base = grads([1.0, 1.0, 1.0])
    assert all(len(g) > 4 for g in base)
    for k in range(3):
        scaled = grads([1000.0 if j == k else 1.0 for j in range(3)])
        for j in range(3):
            same = all(torch.equal(a, b) for a, b in zip(base[j], scaled[j]))
            assert same == (j != k), f"scaling chunk {k}'s loss {'changed' if j != k else 'kept'} chunk {j}'s grads"
        # chunk k's own gradients scale (loosely: fp rounding) by 1000
        ratio = sum(g.norm() for g in scaled[k]) / sum(g.norm() for g in base[k])
        assert abs(ratio / 1000 - 1) < 1e-3


def test_eval_mode_reaches_every_chunk_and_the_final_head_reports_the_auc():
    """model.eval() switches the chunks' own wrappers too (they sit in a plain list), so ELECTRA's final chunk adds
    its discriminator's AUC histogram at evaluation and not during training."""
    from pretrain.decouple.run import build_chunked_model
    from pretrain.metrics import ROC_PREFIX

    tok = make_tokenizer()
    torch.manual_seed(0)
    model, collator = build_chunked_model(make_cfg(objective="electra", chunks=2), tok)
    batch = micro_batches(collator, tok, n_micro=1)[0]

    def keys():
        inputs, found = None, set()
        for chunk in model.chunks:
            inputs, out = chunk(batch, inputs)
            found |= {k for k in out if k.startswith(ROC_PREFIX)}
        return found

    assert keys() == set()
    model.eval()
    assert not any(m.training for chunk in model.chunks for m in chunk.modules())
    with torch.no_grad():
        assert keys() == {ROC_PREFIX + "disc_auc"}
    model.train()
    assert all(m.training for chunk in model.chunks for m in chunk.modules())


def test_chunks_own_disjoint_parameters_covering_the_model_and_decoders_are_untied():
    from pretrain.decouple.run import build_chunked_model

    torch.manual_seed(0)
    model, _ = build_chunked_model(make_cfg(objective="span", chunks=2, aux_head="layer"), make_tokenizer())
    owned = [{id(p) for p in model.chunk_parameters(k)} for k in range(2)]
    assert not owned[0] & owned[1]
    assert owned[0] | owned[1] == {id(p) for p in model.parameters()}
    bert = model.model
    assert bert.cls.predictions.decoder.weight is not bert.bert.embeddings.word_embeddings.weight
    assert torch.equal(bert.cls.predictions.decoder.weight, bert.bert.embeddings.word_embeddings.weight)
    assert id(bert.bert.embeddings.word_embeddings.weight) in owned[0]
    assert id(model.objective.sbo_head.dense1.weight) in owned[1]
    assert id(model.aux[0].decoder.weight) in owned[0] and model.aux[0].layer is not None
    # K = 1 keeps the stock tied model
    torch.manual_seed(0)
    one, _ = build_chunked_model(make_cfg(chunks=1), make_tokenizer())
    assert one.model.cls.predictions.decoder.weight is one.model.bert.embeddings.word_embeddings.weight
    assert len(one.aux) == 0


# --------------------------------------------------------------------------- K = 1 is backprop


@pytest.mark.parametrize("objective,schedule", [("mlm", "linear"), ("span", "linear"), ("electra", "linear"),
                                                ("mlm", "onecycle")])
def test_one_chunk_local_training_equals_ordinary_backprop(objective, schedule):
    """K=1: the runtime's steps (normalisers, clipping, AdamW, schedule incl. one-cycle's beta1) give the losses and
    parameters of the trainer's ``accumulate_gradients`` + clip + AdamW on the same model and micro-batches."""
    from accelerate import Accelerator

    from objectives import get_objective
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.schedules import apply_schedule, lr_for
    from pretrain.optim import build_optimizer
    from pretrain.steps.backprop import PretrainModule, accumulate_gradients

    tok = make_tokenizer()
    cfg = make_cfg(objective=objective, chunks=1, max_steps=4, warmup_steps=1, schedule=schedule)
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 32, length=32))]

    torch.manual_seed(0)
    obj = get_objective(objective, tok, seed=cfg.train.seed)
    module = PretrainModule(obj.build_model(cfg.model), obj)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(module, cfg.train, "cpu")
    module, optimizer = accelerator.prepare(module, optimizer)
    ref_losses = []
    for step in range(4):
        apply_schedule(optimizer, cfg.train, step)
        micro = [obj.collate(examples[8 * step + 4 * i: 8 * step + 4 * i + 4]) for i in range(2)]
        outs = accumulate_gradients(module, obj, micro, accelerator)
        ref_losses.append([float(o["loss"].detach()) for o in outs])
        accelerator.clip_grad_norm_(module.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    pipeline = Pipeline(model, cfg, Layout("simulated", 1, 1, 0), torch.device("cpu"))
    stage = pipeline.stages[0]
    seen = []
    add = stage.tracker.add
    stage.tracker.add = lambda out: (seen.append(float(out["loss"].detach())), add(out))
    losses = []
    for step in range(4):
        micro = [collator.collate(examples[8 * step + 4 * i: 8 * step + 4 * i + 4]) for i in range(2)]
        pipeline.train_step(micro, window_normalizers(collator, micro, "cpu"), lr_for(cfg.train, step), step)
        losses.append(seen[-2:])
    assert losses == ref_losses
    ref = dict(accelerator.unwrap_model(module).named_parameters())
    got = dict(model.named_parameters())
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


# --------------------------------------------------------------------------- frozen control


def test_freeze_lower_keeps_lower_chunks_at_their_initialisation():
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import window_normalizers

    tok = make_tokenizer()
    cfg = config_from_dict({**decouple_worker.base_config("unused"),
                            "decouple": {"mode": "local", "chunks": 2, "freeze_lower": True}})
    torch.manual_seed(0)
    model, collator = build_chunked_model(cfg, tok)
    before = [[p.detach().clone() for p in model.chunk_parameters(k)] for k in range(2)]
    pipeline = Pipeline(model, cfg, Layout("simulated", 2, 1, 0), torch.device("cpu"))
    micro = micro_batches(collator, tok)
    for _ in range(2):
        pipeline.train_step(micro, window_normalizers(collator, micro, "cpu"), 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.chunk_parameters(0)))
    assert not any(torch.equal(a, b) for a, b in zip(before[1], model.chunk_parameters(1)) if a.dim() >= 2)
    metrics = pipeline.gather_metrics()
    assert "mlm_loss" in metrics and "chunk0_mlm_loss" not in metrics


# --------------------------------------------------------------------------- runs: distributed == simulated


LOSS_KEYS = ("chunk0_mlm_loss", "chunk0_mlm_acc", "chunk1_mlm_loss", "chunk1_mlm_acc", "mlm_loss", "mlm_acc")


@pytest.fixture(scope="module", params=[0, 1], ids=["disjoint", "overlap1"])
def overlap(request) -> list[str]:
    """The runs below with disjoint chunks and with one layer shared across the boundary: their overrides."""
    return [f"decouple.overlap={request.param}"] if request.param else []


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, overlap):
    """K=2 processes (gloo), 6 steps of 2 micro-batches, a checkpoint every 2 steps."""
    run = tmp_path_factory.mktemp("dist") / "run"
    torchrun(2, WORKER, str(TESTS), str(run), *overlap, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    return run


def fit_in_process(cfg):
    """``pretrain.trainer.fit(cfg)`` (the decouple hook) in this process, one thread like the torchrun workers,
    with the workers' in-memory blocks standing in for ``prepare_blocks`` and no fresh-process export check."""
    import pretrain.data
    import pretrain.export
    from pretrain.trainer import fit

    tok = make_tokenizer()
    blocks = packed_examples(tok, 72, length=32)
    data = types.SimpleNamespace(tokenizer=tok, train=blocks[:64], validation=blocks[64:], unigram_counts=None)
    saved, saved_check, threads = getattr(pretrain.data, "prepare_blocks", None), pretrain.export.roundtrip_check, \
        torch.get_num_threads()
    pretrain.data.prepare_blocks = lambda cfg: data
    pretrain.export.roundtrip_check = decouple_worker.skip_roundtrip
    torch.set_num_threads(1)
    try:
        return fit(cfg)
    finally:
        torch.set_num_threads(threads)
        pretrain.export.roundtrip_check = saved_check
        if saved is None:
            del pretrain.data.prepare_blocks
        else:
            pretrain.data.prepare_blocks = saved


def worker_config(output_dir, overrides: list[str]):
    """The torchrun worker's config with dotted ``overrides``."""
    from pretrain.config_io import parse_overrides, set_dotted

    tree = decouple_worker.base_config(str(output_dir))
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    return config_from_dict(tree)


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory, overlap):
    """The distributed run's config in one process."""
    run = tmp_path_factory.mktemp("sim") / "run"
    fit_in_process(worker_config(run, overlap))
    return run


def test_distributed_and_simulated_runtimes_give_the_same_losses_and_parameters(distributed_run, simulated_run):
    dist, sim = train_records(distributed_run), train_records(simulated_run)
    assert sorted(dist) == sorted(sim) == list(range(1, 7))
    for step in dist:
        for key in LOSS_KEYS:
            assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)
    for k in range(2):
        a = load_file(str(distributed_run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        b = load_file(str(simulated_run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    evals = [json.loads(x) for x in (distributed_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"] and "chunk0_mlm_loss" in evals[-1]


def test_metrics_have_the_trainer_format_with_per_chunk_losses(distributed_run):
    rec = train_records(distributed_run)[2]
    for key in ("step", "lr", "tokens", "tok_per_s", "grad_norm", "loss", "n_masked", "chunk0_grad_norm",
                *LOSS_KEYS):
        assert key in rec, key
    assert rec["tokens"] == 2 * 2 * 4 * 32 and rec["loss"] == rec["mlm_loss"]
    ckpts = sorted(p.name for p in (distributed_run / "checkpoints").iterdir())
    assert ckpts == ["step-4", "step-6"]
    step = distributed_run / "checkpoints" / "step-6"
    assert sorted(p.name for p in step.iterdir()) == ["COMPLETE", "chunk0", "chunk1", "trainer_state.json"]


def test_export_is_the_stitched_model_and_loads_in_a_fresh_process(distributed_run):
    from pretrain.decouple.run import AUX_HEADS_FILE, load_run
    from pretrain.hf_io import roundtrip_check

    export = distributed_run / "export"
    weights = load_file(str(export / "model.safetensors"))
    assert not any("aux" in k for k in weights) and "cls.predictions.decoder.weight" in weights
    assert not torch.equal(weights["cls.predictions.decoder.weight"], weights["bert.embeddings.word_embeddings.weight"])
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is False
    aux = load_file(str(export / AUX_HEADS_FILE))
    assert aux and all(k.startswith("aux.0.") for k in aux)

    model, tok, _ = load_run(distributed_run)  # every chunk of the final checkpoint
    ids = tok(["the quick brown fox jumps over the lazy dog", "seven wizards box"], padding=True, return_tensors="pt")
    result = roundtrip_check(export, "AutoModelForMaskedLM", model.export_model(), ids["input_ids"],
                             ids["attention_mask"])
    assert result["class"] == "BertForMaskedLM" and result["max_abs_err"] <= 1e-5
    # the export's logits are the training model's: its last chunk's head on the stitched encoder
    with torch.no_grad():
        stitched = model.export_model().eval()(**ids).logits
        hidden = model.model.eval().bert(**ids).last_hidden_state
        assert torch.allclose(stitched, model.model.cls(hidden), atol=1e-6)
    assert torch.equal(aux["aux.0.decoder.weight"], model.aux[0].decoder.weight)


def test_export_command_stitches_a_decoupled_checkpoint(distributed_run, tmp_path):
    """``pretrain-export RUN`` on a decoupled run writes the same stitched model as the end of training."""
    from pretrain.cli import export_main

    assert export_main([str(distributed_run), "--out", str(tmp_path / "again")]) == 0
    final = load_file(str(distributed_run / "export" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    older = distributed_run / "checkpoints" / "step-4"
    assert export_main([str(distributed_run), "--checkpoint", str(older), "--out", str(tmp_path / "old")]) == 0
    old = load_file(str(tmp_path / "old" / "model.safetensors"))
    assert not torch.equal(old["bert.encoder.layer.0.attention.self.query.weight"],
                           final["bert.encoder.layer.0.attention.self.query.weight"])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` no longer runs (gone, or a zombie whose parent we killed)."""
    deadline = time.time() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        assert time.time() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.05)


def test_distributed_run_killed_after_a_checkpoint_resumes_exactly(distributed_run, overlap, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", WORKER, str(TESTS), str(run), *overlap]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SLOW_FETCH_S="0.05", SKIP_ROUNDTRIP="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    try:
        while not (run / "checkpoints" / "step-2" / "COMPLETE").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before step 2 was saved"
            time.sleep(0.02)
    finally:
        # torchrun starts each worker in its own session: kill the workers (the whole tree), then torchrun
        tree = descendants(proc.pid)
        for pid in tree + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert len(tree) >= 2, f"expected torchrun's two workers, found processes {tree}"
    for pid in tree:
        wait_gone(pid)
    assert not (run / "export").exists() and not (run / "checkpoints" / "step-6").exists(), \
        "killed too late to test a resume"
    out = torchrun(2, WORKER, str(TESTS), str(run), *overlap, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    resumed_at = int(out.stdout.split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert 2 <= resumed_at < 6
    ref, got = train_records(distributed_run), train_records(run)
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        assert {k: got[step][k] for k in LOSS_KEYS} == {k: ref[step][k] for k in LOSS_KEYS}, step
    for k in range(2):
        a = load_file(str(distributed_run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        b = load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_distributed_checkpoint_resumes_in_the_simulated_runtime(distributed_run, tmp_path):
    """Checkpoints are per chunk and runtime-independent: resume the distributed run's step-4 in one process."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(distributed_run, run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "export")
    metrics = run / "metrics.jsonl"  # keep only what the run had logged by step 4
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line).get("step", 0) <= 4))
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["output_dir"] = str(run)
    tree["decouple"]["runtime"] = "simulated"  # a resumable change
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    fit_in_process(config_from_dict(tree))
    ref, got = train_records(distributed_run), train_records(run)
    assert sorted(got) == list(range(1, 7))
    for step in (5, 6):
        for key in LOSS_KEYS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
    for k in range(2):
        a = load_file(str(distributed_run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        b = load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_electra_distributed_equals_simulated_with_dropout(tmp_path):
    """ELECTRA carries the sampled "replaced" labels across the boundary; dropout masks come from per-chunk RNG
    streams, so even with dropout both runtimes agree."""
    args = ["objective.name=electra", "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "train.max_steps=3",
            "train.eval_every=0", "train.save_every=0"]
    torchrun(2, WORKER, str(TESTS), str(tmp_path / "dist"), *args, timeout=240)
    torchrun(1, WORKER, str(TESTS), str(tmp_path / "sim"), *args, timeout=240)
    dist, sim = train_records(tmp_path / "dist"), train_records(tmp_path / "sim")
    assert sorted(dist) == [1, 2, 3]
    for step in dist:
        for key in ("gen_loss", "chunk0_disc_loss", "disc_loss", "disc_acc"):
            assert dist[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.slow
def test_cpu_smoke_local_updates_beat_the_frozen_random_lower_half(tmp_path, demo_cache_dir):
    """DESIGN.md §4 smoke test on the demo corpus (hidden 128, 4 layers, batch 64, 200 steps, fixed validation
    masks): backprop and local K=2 beat the frozen-random lower half by > 0.05 nats each (thresholds recalibrated
    from DESIGN's 0.15/0.05: see ``SMOKE`` in scripts/compare_decoupling.py). Minutes on 2 cores."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the demo corpus needs Debian's apt-get and dpkg-deb")
    script = TESTS.parent / "scripts" / "compare_decoupling.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--arms", "backprop", "local-K2", "frozen-lower-K2",
         "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
         "--override", f"data.cache_dir={demo_cache_dir}"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------- data-parallel pipelines


def test_two_data_parallel_pipelines_train_like_one_pipeline_of_twice_the_micro_batch(tmp_path, simulated_run,
                                                                                        overlap):
    """D = 2 replicas of a K = 2 pipeline (4 gloo processes, rank = dp_index * 2 + chunk), micro-batch 2: replica d
    reads the d-th half of each global micro-batch, counts and gradients are summed over a chunk's replicas, so the
    losses and weights equal one pipeline of micro-batch 4 (the simulated run; dropout 0). Pipeline 0 alone logs,
    evaluates and writes the checkpoints."""
    run = tmp_path / "dp"
    torchrun(4, WORKER, str(TESTS), str(run), "train.micro_batch_size=2", *overlap, timeout=300,
             env={"SKIP_ROUNDTRIP": "1"})
    dp, sim = train_records(run), train_records(simulated_run)
    assert sorted(dp) == sorted(sim) == list(range(1, 7))
    for step in dp:
        assert dp[step]["tokens"] == sim[step]["tokens"] and dp[step]["n_masked"] == sim[step]["n_masked"]
        for key in LOSS_KEYS:
            assert dp[step][key] == pytest.approx(sim[step][key], rel=1e-5, abs=1e-6), (step, key)
    for k in range(2):
        a = load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        b = load_file(str(simulated_run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "train" and "mlm_loss" in r for r in records) == 6  # one logger, not one per pipeline
    assert (run / "export" / "model.safetensors").is_file()
    # every replica resumes from pipeline 0's checkpoint: drop step 6 and train it again, bit for bit
    final = {k: load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors")) for k in range(2)}
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "export")
    proc = torchrun(4, WORKER, str(TESTS), str(run), "train.micro_batch_size=2", *overlap, timeout=300,
                    env={"SKIP_ROUNDTRIP": "1"})
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout
    for k in range(2):
        again = load_file(str(run / "checkpoints" / "step-6" / f"chunk{k}" / "model.safetensors"))
        assert all(torch.equal(again[name], final[k][name]) for name in final[k])


@pytest.mark.parametrize("processes, mode, message", [
    (3, "local", "launch 2 processes .* or a multiple of 2"),
    (4, "synthetic", "implemented for decouple.mode=local only"),
])
def test_launch_sizes_that_are_not_pipelines_are_refused(monkeypatch, processes, mode, message):
    from pretrain.decouple.layout import resolve_layout

    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.setenv("RANK", "0")
    tree = decouple_worker.base_config("unused")
    tree["decouple"] = {"mode": mode, "chunks": 2}
    with pytest.raises((ValueError, NotImplementedError), match=message):
        resolve_layout(config_from_dict(tree).decouple)
