"""Local, then backprop (``decouple.until_step``): the decoupled pipeline for steps 1..N, then end-to-end backprop
of the stitched model in the same loop. The switch happens at N (chunk metrics before, backprop metrics after, one
record per step, one LR schedule, one global batch), hands over the chunks' parameters and AdamW state, resumes
exactly from either side, and runs the same in one process and in 2 (and 2 x 2) gloo processes."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import torchrun
from helpers import assert_config_rejected, make_tokenizer, train_records
from pretrain.config import config_from_dict

TESTS = Path(__file__).parent
WORKER = str(TESTS / "dist" / "decouple_worker.py")
sys.path.insert(0, str(TESTS / "dist"))
import decouple_worker  # noqa: E402
from test_decouple import fit_in_process, micro_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3  # the last decoupled step of the runs below (6 steps, a checkpoint after every step)
RUN = ["decouple.until_step=3", "train.save_every=1", "train.keep_last=10"]
CHUNK_KEYS = ("chunk0_mlm_loss", "chunk1_mlm_loss")


def hybrid_tree(output_dir, mode="local", dropout=0.0, until_step=N, **train):
    tree = decouple_worker.base_config(str(output_dir))
    tree["decouple"].update(mode=mode, until_step=until_step)
    tree["model"].update(hidden_dropout=dropout, attention_dropout=dropout)
    tree["train"].update(save_every=1, keep_last=10, **train)
    return tree


def load_optimizer(path: Path) -> dict:
    return torch.load(path / "optimizer.bin", weights_only=True)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("tree, message", [
    ({"decouple": {"mode": "none", "until_step": 2}}, "until_step .* needs decouple.mode local or synthetic"),
    ({"decouple": {"mode": "local", "chunks": 2, "until_step": 0}}, "until_step must be >= 1"),
    ({"decouple": {"mode": "local", "chunks": 2, "until_step": 1000}, "train": {"max_steps": 1000}},
     r"until_step \(1000\) must be < train.max_steps \(1000\)"),
])
def test_bad_until_step_fails_naming_the_fix(tree, message):
    assert_config_rejected(tree, message)


def test_the_shipped_config_takes_until_step():
    from pretrain.config import load_config

    cfg = load_config(TESTS.parent / "configs" / "decoupled-local.yaml", ["decouple.until_step=500"])
    assert cfg.decouple.until_step == 500 and cfg.decouple.mode == "local"
    assert "until_step" in (TESTS.parent / "configs" / "decoupled-local.yaml").read_text()


def test_the_backprop_share_keeps_the_global_batch_or_is_refused_at_launch():
    from pretrain.steps.base import LaunchError
    from pretrain.steps.hybrid import backprop_share

    def cfg(micro, accum):
        return config_from_dict(hybrid_tree("unused", micro_batch_size=micro, grad_accum=accum))

    assert backprop_share(cfg(4, 2), 2, "simulated") == (2, 4)
    assert backprop_share(cfg(4, 2), 2, "distributed") == (2, 2)  # micro-batches of b / K
    assert backprop_share(cfg(3, 2), 2, "distributed") == (1, 3)  # else A / K of them
    with pytest.raises(LaunchError, match="must be a multiple of decouple.chunks"):
        backprop_share(cfg(3, 3), 2, "distributed")


# --------------------------------------------------------------------------- the handover


@pytest.mark.parametrize("mode", ["local", "synthetic"])
def test_the_switch_hands_over_the_chunks_parameters_and_adam_state(mode):
    """Two decoupled steps, then the switch: the backprop optimizer covers exactly the stitched model (model +
    objective; auxiliary heads and M_k dropped), each of its parameters has the chunk optimizer's exp_avg,
    exp_avg_sq and step, the parameters are unchanged, and the chunks stepped at the one schedule's LR."""
    import copy

    from pretrain.schedules import lr_for
    from pretrain.steps.hybrid import HybridStep

    tok = make_tokenizer()
    cfg = config_from_dict(hybrid_tree("unused", mode=mode, until_step=2))
    torch.manual_seed(0)
    objective = cfg.objective.build(tok, cfg.train.seed)
    step = HybridStep(cfg)
    step.build(objective, copy.deepcopy(objective), None, tok)
    chunked = step.decoupled.model
    for s in range(2):
        step.train_step(micro_batches(step.collator, tok), lr_for(cfg.train, s), s)
    stages = step.decoupled.pipeline.stages
    assert {g["lr"] for stage in stages for g in stage.optimizer.param_groups} == {lr_for(cfg.train, 1)}
    names = {id(p): n for n, p in chunked.named_parameters()}
    before = {names[id(p)]: (p.detach().clone(), {k: v.clone() for k, v in stage.optimizer.state[p].items()})
              for stage in stages for p in stage.params}
    step.switch()
    inner = step.phase.optimizer.optimizer
    optimized = [p for g in inner.param_groups for p in g["params"]]
    stitched = {id(p) for p in [*chunked.model.parameters(), *chunked.objective.parameters()]}
    assert {id(p) for p in optimized} == stitched
    dropped = [*chunked.aux.parameters(), *chunked.synthetic.parameters()]
    assert dropped and not {id(p) for p in dropped} & stitched
    for p in optimized:
        value, state = before[names[id(p)]]
        assert torch.equal(p.detach(), value), names[id(p)]
        assert set(inner.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in state:
            assert torch.equal(inner.state[p][key], state[key]), (names[id(p)], key)
    assert float(inner.state[optimized[0]]["step"]) == 2.0
    assert step.describe()["phase"] == "backprop"
    with pytest.raises(RuntimeError, match="switched to backprop already"):
        step.switch()


@pytest.mark.parametrize("objective", ["mlm", "span", "electra"])
def test_the_stitched_model_computes_the_chunks_losses(objective):
    """The model backprop trains after the switch is the chunks' function: the objective's forward on the stitched
    model gives every loss part the chunks compute (the stem's in chunk 0, the real head's in the last; SpanBERT's
    SBO reads the untied decoder matrix, as the last chunk does; the decoder is perturbed so that it differs from
    the word embeddings, as after training)."""
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.decouple.run import build_chunked_model
    from test_decouple import make_cfg

    tok = make_tokenizer()
    torch.manual_seed(0)
    model, collator = build_chunked_model(make_cfg(objective=objective, chunks=2), tok)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "decoder" in name or "generator_lm_head" in name:
                p.add_(torch.randn_like(p))
    batch = micro_batches(collator, tok, n_micro=1)[0]
    norms = window_normalizers(collator, [batch], "cpu")
    torch.manual_seed(1)  # ELECTRA's generator samples in chunk 0's stem: the same draws both times
    inputs, parts = None, {}
    for chunk in model.chunks:
        inputs, out = chunk(batch, inputs, norms)
        parts.update(out)  # the stem's parts (chunk 0) and the real head's (the last chunk), unprefixed
    torch.manual_seed(1)
    whole = model.objective(model.model, batch, norms)
    assert set(model.objective.loss_parts) <= set(parts)
    for part in model.objective.loss_parts:
        torch.testing.assert_close(whole[part], parts[part], rtol=1e-6, atol=1e-6, msg=part)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def simulated_hybrid(tmp_path_factory):
    run = tmp_path_factory.mktemp("hybrid-sim") / "run"
    fit_in_process(config_from_dict(hybrid_tree(run)))
    return run


@pytest.fixture(scope="module")
def decoupled_reference(tmp_path_factory):
    """The same run without the switch: its steps 1..N are the hybrid run's."""
    run = tmp_path_factory.mktemp("decoupled") / "run"
    fit_in_process(config_from_dict(hybrid_tree(run, until_step=None)))
    return run


def test_the_run_switches_at_until_step_in_one_loop(simulated_hybrid):
    from pretrain.schedules import lr_for

    records = [json.loads(x) for x in (simulated_hybrid / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))  # one record per step
    for r in train:
        decoupled = r["step"] <= N
        assert all((key in r) == decoupled for key in CHUNK_KEYS), r
        assert r["mlm_loss"] > 0 and r["tokens"] == r["step"] * 2 * 4 * 32  # the same global batch throughout
    cfg = config_from_dict(hybrid_tree("unused"))
    assert [r["lr"] for r in train] == [lr_for(cfg.train, s) for s in range(6)]  # one schedule over max_steps
    switches = [r for r in records if r.get("event") == "switch"]
    assert [(r["step"], r["phase"]) for r in switches] == [(N, "backprop")]
    evals = [r for r in records if r["split"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6] and "chunk0_mlm_loss" in evals[0]
    assert "chunk0_mlm_loss" not in evals[1] and evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]
    ckpts = simulated_hybrid / "checkpoints"
    for s in range(1, 7):
        state = json.loads((ckpts / f"step-{s}" / "trainer_state.json").read_text())
        files = {p.name for p in (ckpts / f"step-{s}").iterdir()}
        if s < N:
            assert "phase" not in state and {"chunk0", "chunk1"} <= files
        else:
            assert state["phase"] == "backprop" and {"model.safetensors", "optimizer.bin"} <= files
            assert "chunk0" not in files


def test_the_first_backprop_checkpoint_holds_the_chunks_parameters_and_moments(simulated_hybrid,
                                                                                decoupled_reference):
    """Checkpoint N of the hybrid run (backprop) against checkpoint N of the same run without the switch
    (chunks): every tensor of the stitched model, and each parameter's exp_avg / exp_avg_sq / step, are the ones the
    chunk that owned it held."""
    from pretrain.decouple.run import build_chunked_model
    from pretrain.steps.backprop import PretrainModule

    got = load_file(str(simulated_hybrid / "checkpoints" / f"step-{N}" / "model.safetensors"))
    ref = {}
    chunk_states = []
    for k in range(2):
        chunk_dir = decoupled_reference / "checkpoints" / f"step-{N}" / f"chunk{k}"
        ref.update(load_file(str(chunk_dir / "model.safetensors")))
        chunk_states.append(torch.load(chunk_dir / "state.pt", weights_only=True)["optimizer"])
    assert len(got) > 20 and set(got) <= set(ref)
    for name in got:
        assert torch.equal(got[name], ref[name]), name
    # optimizer states are indexed by position: rebuild both orders to name them
    cfg = config_from_dict(hybrid_tree("unused"))
    torch.manual_seed(0)
    chunked, _ = build_chunked_model(cfg, make_tokenizer())
    names = {id(p): n for n, p in chunked.named_parameters()}
    stitched = list(PretrainModule(chunked.model, chunked.objective).parameters())  # the backprop optimizer's
    backprop_order = [names[id(p)] for p in [*[p for p in stitched if p.dim() >= 2],
                                              *[p for p in stitched if p.dim() < 2]]]
    by_name = {}
    for k, state in enumerate(chunk_states):
        params = chunked.chunk_parameters(k)
        order = [names[id(p)] for p in [*[p for p in params if p.dim() >= 2], *[p for p in params if p.dim() < 2]]]
        by_name.update({order[i]: s for i, s in state["state"].items()})
    bp = load_optimizer(simulated_hybrid / "checkpoints" / f"step-{N}")["state"]
    assert len(bp) == len(backprop_order)
    for i, name in enumerate(backprop_order):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(bp[i][key], by_name[name][key]), (name, key)
    assert float(bp[0]["step"]) == N


@pytest.fixture(scope="module")
def dropout_hybrid(tmp_path_factory):
    run = tmp_path_factory.mktemp("hybrid-dropout") / "run"
    fit_in_process(config_from_dict(hybrid_tree(run, dropout=0.1)))
    return run


@pytest.mark.parametrize("resume_at", [2, N, 5])
def test_resuming_before_at_or_after_the_switch_equals_the_uninterrupted_run(dropout_hybrid, tmp_path, resume_at):
    """With dropout: a decoupled checkpoint (2) resumes into the decoupled phase and switches at N; the switch's own
    checkpoint (N) and a later one (5) resume into backprop. Every step's losses and the final weights are
    bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(dropout_hybrid, run)
    for s in range(resume_at + 1, 7):
        shutil.rmtree(run / "checkpoints" / f"step-{s}")
    shutil.rmtree(run / "export")
    fit_in_process(config_from_dict(hybrid_tree(run, dropout=0.1)))
    ref, got = train_records(dropout_hybrid), train_records(run)
    assert sorted(got) == list(range(1, 7))
    for s in ref:
        losses = {k: v for k, v in ref[s].items() if k.endswith(("_loss", "_acc"))}
        assert losses and {k: got[s][k] for k in losses} == losses, s
    a = load_file(str(dropout_hybrid / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    starts = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert starts[-1]["step"] == resume_at and starts[-1]["phase"] == ("decoupled" if resume_at < N else "backprop")


def test_the_export_is_the_stitched_stock_model_and_pretrain_export_reads_both_phases(simulated_hybrid, tmp_path):
    from transformers import AutoModelForMaskedLM

    from pretrain.cli import export_main

    export = simulated_hybrid / "export"
    assert not (export / "aux_heads.safetensors").exists()  # the auxiliary heads were dropped at the switch
    model = AutoModelForMaskedLM.from_pretrained(str(export))
    assert type(model).__name__ == "BertForMaskedLM" and model.config.tie_word_embeddings is False
    final = load_file(str(export / "model.safetensors"))
    trained = load_file(str(simulated_hybrid / "checkpoints" / "step-6" / "model.safetensors"))
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "cls.predictions.decoder.weight"):
        assert torch.equal(final[name], trained["model." + name])
    assert export_main([str(simulated_hybrid), "--out", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    before = simulated_hybrid / "checkpoints" / "step-2"  # a decoupled checkpoint of the same run
    assert export_main([str(simulated_hybrid), "--checkpoint", str(before), "--out", str(tmp_path / "old")]) == 0
    assert (tmp_path / "old" / "aux_heads.safetensors").is_file()


def test_synthetic_gradients_get_the_hybrid_schedule(tmp_path):
    run = tmp_path / "run"
    fit_in_process(config_from_dict(hybrid_tree(run, mode="synthetic")))
    records = train_records(run)
    assert sorted(records) == list(range(1, 7))
    assert all(("chunk0_sg_loss" in records[s]) == (s <= N) for s in records)
    assert json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())["phase"] == "backprop"


# --------------------------------------------------------------------------- distributed == simulated


def assert_same_run(a: Path, b: Path, rtol=1e-5):
    ra, rb = train_records(a), train_records(b)
    assert sorted(ra) == sorted(rb) == list(range(1, 7))
    for s in ra:
        assert ra[s]["tokens"] == rb[s]["tokens"]
        for key in [k for k in ra[s] if k.endswith("_loss")]:
            assert ra[s][key] == pytest.approx(rb[s][key], rel=rtol, abs=1e-6), (s, key)
    for s in (N, 6):
        wa = load_file(str(a / "checkpoints" / f"step-{s}" / "model.safetensors"))
        wb = load_file(str(b / "checkpoints" / f"step-{s}" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=rtol * 10, atol=1e-6, msg=name)
    oa, ob = load_optimizer(a / "checkpoints" / f"step-{N}"), load_optimizer(b / "checkpoints" / f"step-{N}")
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(oa["state"][i][key], ob["state"][i][key], rtol=rtol * 10, atol=1e-8)


@pytest.fixture(scope="module")
def distributed_hybrid(tmp_path_factory):
    """K = 2 gloo processes, one chunk each until step N, then two data-parallel replicas of micro-batch 2."""
    run = tmp_path_factory.mktemp("hybrid-dist") / "run"
    proc = torchrun(2, WORKER, str(TESTS), str(run), *RUN, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    assert "(2 x 2 accumulated x 2)" in proc.stdout  # after the switch: 2 replicas of 2 micro-batches of 2
    return run


def test_distributed_hybrid_equals_simulated(distributed_hybrid, simulated_hybrid):
    """Before the switch rank 1 holds chunk 1 only: the stitched model and moments at step N (written by rank 0)
    are complete only if every chunk reached every process."""
    assert_same_run(distributed_hybrid, simulated_hybrid)
    assert (distributed_hybrid / "export" / "model.safetensors").is_file()  # exported by the logging rank 1


def test_distributed_hybrid_resumes_from_a_backprop_checkpoint(distributed_hybrid, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(distributed_hybrid, run)
    for s in (5, 6):
        shutil.rmtree(run / "checkpoints" / f"step-{s}")
    shutil.rmtree(run / "export")
    proc = torchrun(2, WORKER, str(TESTS), str(run), *RUN, timeout=240, env={"SKIP_ROUNDTRIP": "1"})
    assert "(step 4)" in proc.stdout
    a = load_file(str(distributed_hybrid / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_two_data_parallel_pipelines_switch_to_four_replicas(tmp_path, simulated_hybrid):
    """D = 2 pipelines x K = 2 chunks of micro-batch 2 (= one pipeline of 4), then 4 replicas of micro-batch 1:
    the same global batch, losses and weights as the simulated run."""
    run = tmp_path / "dp"
    proc = torchrun(4, WORKER, str(TESTS), str(run), *RUN, "train.micro_batch_size=2", timeout=300,
                    env={"SKIP_ROUNDTRIP": "1"})
    assert "(4 x 2 accumulated x 1)" in proc.stdout
    assert_same_run(run, simulated_hybrid, rtol=1e-4)
