"""EWC continued pretraining (pretrain/ewc.py): the per-sample Fisher against an independent loop, the penalty's
value and gradient, the penalty added once per optimizer step whatever grad_accum, and continued runs from a tiny
export: training with the penalty logged, exact resume, the lambda-0 baseline arm, and bad sources that fail clearly."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import Planted, make_tokenizer, packed_examples, tiny_model_config, toy_corpus
from objectives import get_objective
from pretrain.config import ConfigError, config_from_dict, config_to_dict, load_config
from pretrain.ewc import EWC_FILE, EWCPenalty, SourceError, estimate_fisher, trainable
from pretrain.optim import build_optimizer
from pretrain.steps.backprop import PretrainModule, accumulate_gradients
from pretrain.trainer import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_module(seed: int = 0):
    tok = make_tokenizer()
    torch.manual_seed(seed)
    obj = get_objective("mlm", tok, seed=1)
    return tok, obj, PretrainModule(obj.build_model(tiny_model_config()), obj)


def indexed_examples(tok, n: int, length: int = 32) -> list[dict]:
    return [dict(e, index=i) for i, e in enumerate(packed_examples(tok, n, length=length))]


# ----------------------------------------------------------------------------------------------- config


def test_config_key_lambda_round_trips_and_needs_a_source():
    cfg = load_config("configs/tiny.yaml", ["train.ewc.lambda=10", "train.ewc.source=runs/x/export"])
    assert cfg.train.ewc.lam == 10.0 and cfg.train.ewc.source == "runs/x/export"
    saved = config_to_dict(cfg)
    assert saved["train"]["ewc"]["lambda"] == 10.0 and "lam" not in saved["train"]["ewc"]
    assert config_from_dict(saved) == cfg
    with pytest.raises(ConfigError, match="lambda > 0 needs train.ewc.source"):
        load_config("configs/tiny.yaml", ["train.ewc.lambda=1"])
    with pytest.raises(ConfigError, match="lambda must be >= 0"):
        load_config("configs/tiny.yaml", ["train.ewc.lambda=-1", "train.ewc.source=x"])
    with pytest.raises(ConfigError, match="did you mean 'train.ewc.lambda'"):
        load_config("configs/tiny.yaml", ["train.ewc.lamda=1"])


# ----------------------------------------------------------------------------------------------- Fisher


def test_fisher_is_the_mean_of_per_block_squared_gradients():
    """estimate_fisher (sparse MLM head, PretrainModule) against an independent loop: full [L, V] logits of the
    HF model, F.cross_entropy averaged over the block's labelled tokens, torch.autograd.grad per block."""
    tok, obj, module = tiny_module()
    examples = indexed_examples(tok, 6)
    fisher, used = estimate_fisher(module, obj.collate, examples, obj.counts)
    assert used == len(examples)

    model = module.model.eval()
    params = {f"model.{n}": p for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for example in examples:
        batch = obj.collate([example])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                expected[name] += g.square() / len(examples)

    assert fisher.keys() == expected.keys() and len(fisher) > 10
    scale = max(float(f.max()) for f in expected.values())
    for name in fisher:
        assert (fisher[name] >= 0).all(), name
        # the two paths differ only in fp32 summation order (sparse vs full logits): ~1e-6 relative per gradient
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert float(fisher["model.bert.embeddings.word_embeddings.weight"].sum()) > 0
    # per-sample, not the square of the batch's mean gradient (which would be ~B times smaller at a minimum)
    batch = obj.collate(examples)
    loss = module(batch)["loss"]
    (g_batch,) = torch.autograd.grad(loss, [params["model.bert.encoder.layer.0.output.dense.weight"]])
    assert not torch.allclose(g_batch.square(), fisher["model.bert.encoder.layer.0.output.dense.weight"], rtol=0.1)


# ----------------------------------------------------------------------------------------------- penalty


def random_penalty(module, lam: float, seed: int = 0) -> EWCPenalty:
    gen = torch.Generator().manual_seed(seed)
    params = trainable(module)
    return EWCPenalty(lam, {n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                      {n: p.detach().clone() for n, p in params.items()})


def perturb(module, seed: int = 1, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(module).values():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_penalty_is_zero_at_theta_star_and_its_gradient_is_lam_f_delta():
    _, _, module = tiny_module()
    lam = 3.0
    penalty = random_penalty(module, lam)
    assert float(penalty.value(module).detach()) == 0.0
    assert float(penalty.add_gradient(module)) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in trainable(module).values())
    module.zero_grad(set_to_none=True)

    perturb(module)
    params = trainable(module)
    value = penalty.value(module)
    deltas = {n: p.detach().double() - penalty.theta_star[n].double() for n, p in params.items()}
    by_hand = 0.5 * lam * sum(float((penalty.fisher[n].double() * d.square()).sum()) for n, d in deltas.items())
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-5)
    autograd = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
    returned = penalty.add_gradient(module)
    assert float(returned) == pytest.approx(by_hand, rel=1e-5)
    for name, p in params.items():
        analytic = lam * penalty.fisher[name] * (p.detach() - penalty.theta_star[name])
        torch.testing.assert_close(p.grad, analytic, msg=name)
        torch.testing.assert_close(autograd[name], analytic, msg=name)


def step_with_penalty(micro_batches: list[list[dict]], lam: float):
    """The trainer's step on a fresh tiny model: accumulate the window, add the EWC gradient once, AdamW step.
    Returns (gradients before the step, parameters before it, parameters after it, the penalty)."""
    from accelerate import Accelerator

    tok, obj, module = tiny_module()
    penalty = random_penalty(module, lam)
    perturb(module)
    accelerator = Accelerator(cpu=True)
    cfg = load_config("configs/tiny.yaml").train
    module, optimizer = accelerator.prepare(module, build_optimizer(module, cfg, "cpu"))
    accumulate_gradients(module, obj, [obj.collate(m) for m in micro_batches], accelerator)
    if lam:
        penalty.add_gradient(module)
    grads = {n: p.grad.clone() for n, p in trainable(module).items()}
    before = {n: p.detach().clone() for n, p in trainable(module).items()}
    optimizer.step()
    return grads, before, {n: p.detach().clone() for n, p in trainable(module).items()}, penalty


def test_penalty_is_added_once_per_optimizer_step_whatever_grad_accum():
    tok = make_tokenizer()
    ex = indexed_examples(tok, 4)
    g1, theta, p1, penalty = step_with_penalty([ex], lam=5.0)
    g2, _, p2, _ = step_with_penalty([ex[:2], ex[2:]], lam=5.0)
    g0, _, _, _ = step_with_penalty([ex[:2], ex[2:]], lam=0.0)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(p2[name], p1[name], atol=1e-6, rtol=1e-5, msg=name)
        delta = theta[name] - penalty.theta_star[name]
        # exactly one λ·F·(θ−θ*) on top of the data gradient (twice would fail wherever F·Δ is not ~0)
        torch.testing.assert_close(g2[name] - g0[name], 5.0 * penalty.fisher[name] * delta, atol=1e-6, rtol=1e-4,
                                   msg=name)


# ----------------------------------------------------------------------------------------------- runs


def write_corpus(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "docs.txt").write_text("\n".join(toy_corpus(n_docs=200, seed=seed)) + "\n")
    return directory / "docs.txt"


def run_config(out: Path, corpus: Path, cache: Path, ewc: dict | None = None, **train):
    return config_from_dict({
        "output_dir": str(out),
        "data": {"files": [str(corpus)], "block_size": 32, "validation_fraction": 0.1, "cache_dir": str(cache),
                 "num_workers": 0},
        "tokenizer": {"vocab_size": 200},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant",
                  "save_every": 3, "log_every": 1, "eval_every": 0, "eval_batches": 2, "keep_last": 3,
                  "device": "cpu", "ewc": ewc or {}, **train},
        "log": {"tensorboard": False},
    })


def train_log(run: Path) -> dict[int, dict]:
    """Last logged train record per step (a resumed run re-logs the steps it redoes)."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny export trained on corpus A (6 steps); corpus B is the new domain."""
    d = tmp_path_factory.mktemp("ewc")
    a, b = write_corpus(d / "a", seed=11), write_corpus(d / "b", seed=12)
    fit(run_config(d / "source", a, d / "cache"))
    return {"dir": d, "export": d / "source" / "export", "a": a, "b": b, "cache": d / "cache"}


def continued(source, name: str, lam: float, **train):
    ewc = {"lambda": lam, "source": str(source["export"]), "fisher_batches": train.pop("fisher_batches", 2)}
    return run_config(source["dir"] / name, source["b"], source["cache"], ewc, **train)


@pytest.mark.slow
def test_continued_run_with_ewc_trains_logs_penalty_and_resumes_exactly(source, capsys):
    full = continued(source, "full", lam=50.0)
    fit(full)
    run = Path(full.output_dir)
    log = train_log(run)
    assert sorted(log) == list(range(1, 7))
    assert log[1]["ewc_penalty"] == 0.0, "the first step starts at θ* (the source's weights)"
    assert all(log[s]["ewc_penalty"] > 0 for s in range(2, 7))
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["mlm_loss"] < log[1]["mlm_loss"], "continued pretraining did not learn the new corpus"
    saved = load_config(run / "config.yaml")
    assert saved.tokenizer.path == str(source["export"].resolve())
    assert saved.train.ewc.fisher_data.files == [str(source["a"])], "default Fisher corpus = the source's"
    assert (run / EWC_FILE).is_file() and (run / "checkpoints" / "step-6" / "custom_checkpoint_0.pkl").is_file()

    part = continued(source, "resumed", lam=50.0, max_steps=3)
    fit(part)
    resumed = Path(part.output_dir)
    fisher_mtime = (resumed / EWC_FILE).stat().st_mtime_ns
    capsys.readouterr()
    fit(continued(source, "resumed", lam=50.0))
    out = capsys.readouterr().out
    assert "resumed from" in out and "reusing the Fisher" in out
    assert (resumed / EWC_FILE).stat().st_mtime_ns == fisher_mtime
    got = train_log(resumed)
    for step in range(1, 7):
        assert (got[step]["mlm_loss"], got[step]["ewc_penalty"]) == (log[step]["mlm_loss"], log[step]["ewc_penalty"])
    a = load_file(str(run / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_planted_pickle_in_a_checkpoints_ewc_state_is_refused_and_never_runs(source, tmp_path, monkeypatch):
    import pretrain.export
    from pretrain.checkpoint import COMPLETE, CheckpointError

    monkeypatch.setattr(pretrain.export, "roundtrip_check", lambda *a, **k: {"class": "-", "max_abs_err": 0.0})
    cfg = continued(source, "planted", lam=50.0, max_steps=3)
    fit(cfg)
    step = Path(cfg.output_dir) / "checkpoints" / "step-3"
    assert (step / "custom_checkpoint_0.pkl").is_file(), "the checkpoint carries F and θ*"
    marker = tmp_path / "pwned"
    torch.save({"fisher/x": Planted(marker)}, step / "custom_checkpoint_0.pkl")
    (step / COMPLETE).write_text("ok\n")  # no checksums: the loader alone must refuse the object
    with pytest.raises(CheckpointError, match="step-3 is damaged: custom_checkpoint_0.pkl does not load as tensors"):
        fit(continued(source, "planted", lam=50.0))
    assert not marker.exists(), "a checkpoint file ran code on resume"


def assert_same_four_steps(one: Path, two: Path) -> None:
    """Two runs logged the same MLM losses and EWC penalties at steps 1-4, and the penalty is active by then."""
    a, b = train_log(one), train_log(two)
    for step in range(1, 5):
        assert b[step]["mlm_loss"] == pytest.approx(a[step]["mlm_loss"], abs=1e-5)
        assert b[step]["ewc_penalty"] == pytest.approx(a[step]["ewc_penalty"], rel=1e-4, abs=1e-9)
    assert a[4]["ewc_penalty"] > 0


@pytest.mark.slow
def test_grad_accum_2_gives_the_same_ewc_run_as_1(source):
    """micro 4 x accum 1 vs micro 2 x accum 2 (fisher_batches doubled so both Fishers use the same 8 blocks): the
    same per-step losses and penalties, so the penalty is added once per optimizer step inside fit."""
    one = continued(source, "accum1", lam=50.0, max_steps=4)
    two = continued(source, "accum2", lam=50.0, max_steps=4, micro_batch_size=2, grad_accum=2, fisher_batches=4)
    fit(one)
    fit(two)
    assert_same_four_steps(Path(one.output_dir), Path(two.output_dir))


@pytest.mark.slow
def test_two_processes_give_the_same_ewc_run_as_one(source):
    """2 gloo processes x micro 2 vs 1 process x micro 4 (same 8 Fisher blocks): the penalty is not counted per
    process. Rank 0 estimates and saves the Fisher, rank 1 reads it."""
    from distributed import torchrun

    one = continued(source, "world1", lam=50.0, max_steps=4)
    two = continued(source, "world2", lam=50.0, max_steps=4, micro_batch_size=2, fisher_batches=4)
    path = source["dir"] / "world2.yaml"
    path.write_text(json.dumps(config_to_dict(two)))
    torchrun(2, str(Path(__file__).parent.parent / "scripts" / "pretrain.py"), str(path))
    fit(one)
    assert_same_four_steps(Path(one.output_dir), Path(two.output_dir))


@pytest.mark.slow
def test_lambda_zero_continues_from_the_source_without_penalty(source):
    cfg = continued(source, "plain", lam=0.0, max_steps=1, lr=1e-12)  # lr ~0: the export must equal the source
    fit(cfg)
    run = Path(cfg.output_dir)
    assert not (run / EWC_FILE).exists() and "ewc_penalty" not in train_log(run)[1]
    a, b = load_file(str(source["export"] / "model.safetensors")), load_file(str(run / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-9, rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_source_fails_with_one_clear_error_and_deletes_nothing(tmp_path, capsys):
    from pretrain.cli import pretrain_main

    corpus = write_corpus(tmp_path / "b", seed=3)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "COMPLETE").write_text("ok\n")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    cfg = run_config(run, corpus, tmp_path / "cache", {"lambda": 1.0, "source": str(tmp_path / "no-such-run/export")})
    with pytest.raises(SourceError, match="no-such-run/export.*not an MLM export"):
        fit(cfg, overwrite=True)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(json.dumps(config_to_dict(cfg)))
    assert pretrain_main([str(yaml_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "train.ewc.source" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert not list(tmp_path.glob("run.bak-*")), "--overwrite must not move a run aside for a config that fails"


def test_mismatched_tokenizer_and_model_name_the_fix(tmp_path):
    """A fake export (config.json + tokenizer; the check runs before any weight is read)."""
    from transformers import BertConfig

    export = tmp_path / "export"
    export.mkdir()
    BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, architectures=["BertForMaskedLM"]).to_json_file(str(export / "config.json"))
    (export / "model.safetensors").write_bytes(b"")
    make_tokenizer().save_pretrained(str(export))
    corpus = write_corpus(tmp_path / "b", seed=3)
    cfg = run_config(tmp_path / "run", corpus, tmp_path / "cache",
                     {"lambda": 1.0, "source": str(export), "fisher_data": {"files": [str(corpus)]}})
    cfg.model.hidden_size, cfg.model.intermediate_size = 64, 128
    cfg.tokenizer.path = str(tmp_path / "other-tokenizer")
    with pytest.raises(SourceError) as e:
        fit(cfg)
    message = str(e.value)
    assert "set tokenizer.path: null" in message
    assert "model.hidden_size: 32" in message and "model.intermediate_size: 64" in message
    assert "num_layers" not in message
    assert not (tmp_path / "run").exists()
