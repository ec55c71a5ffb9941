"""CUDA smoke tests of the fast path: run them on a GPU machine (`pytest tests/test_cuda.py`); skipped without one.

They check what a CPU cannot: the step never waits for the GPU (``torch.cuda.set_sync_debug_mode("error")``), an
unpadded batch takes the flash kernel with dropout also inside the compiled step, the bf16 loss matches the stock
HF model's, and compiled decoupled chunks train like the eager ones."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import make_tokenizer, packed_examples, tiny_model_config
from objectives import get_objective
from pretrain.config import TrainConfig
from pretrain.data.stream import to_device
from pretrain.fast import apply_fast_path, compile_step, fuse_encoders
from pretrain.steps.backprop import PretrainModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPTIONS = {"mlm": {"static_count": True}, "span": {"sbo_position_dim": 8}, "electra": {}}
#: hidden 64 with 2 heads: head_dim 32, which flash attention supports; dropout on, as in pretraining
MODEL = {"hidden_size": 64, "num_heads": 2, "intermediate_size": 256, "hidden_dropout": 0.1, "attention_dropout": 0.1}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def setup(tokenizer, name: str):
    objective = get_objective(name, tokenizer, seed=0, **OPTIONS[name])
    if name == "span":
        objective.set_unigram_counts(torch.ones(len(tokenizer)))
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config(**MODEL))
    return objective, model


def batches(tokenizer, objective, n: int, padded: bool = False) -> list[dict]:
    """``n`` micro-batches of 8 blocks of 64 (the third block 40 long when ``padded``), in pinned memory as the
    trainer's DataLoader delivers them on CUDA."""
    out = []
    for t in range(n):
        examples = packed_examples(tokenizer, 8, length=64, seed=t)
        if padded:
            examples[2] = packed_examples(tokenizer, 1, length=40, seed=100 + t)[0]
        for i, e in enumerate(examples):
            e["index"] = t * 8 + i
        batch = objective.collate(examples)
        out.append({k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


@pytest.mark.parametrize("name", ["mlm", "span", "electra"])
def test_fast_step_never_waits_for_the_gpu(tokenizer, name):
    """The trainer's optimizer step (accumulate_gradients over 2 micro-batches, clip, step_if_finite with fused
    AdamW, zero_grad) under bf16 on the fast path, after compilation: any host-device sync raises."""
    from accelerate import Accelerator

    from pretrain.optim import build_optimizer, step_if_finite
    from pretrain.steps.backprop import accumulate_gradients

    objective, model = setup(tokenizer, name)
    collator = copy.deepcopy(objective)
    apply_fast_path(model, objective, 64)
    accelerator = Accelerator(mixed_precision="bf16")
    module = PretrainModule(model, objective)
    optimizer = build_optimizer(module, TrainConfig(), "cuda")
    module, optimizer = accelerator.prepare(module, optimizer)
    compile_step(module)
    data = batches(tokenizer, collator, 4)

    def step(micro):
        accumulate_gradients(module, collator, micro, accelerator)
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), 1.0)
        skipped = step_if_finite(optimizer, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        return skipped

    for _ in range(3):  # compile, build the optimizer state
        step(data[:2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            skipped = step(data[2:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(skipped) == 0.0


@pytest.mark.parametrize("name", ["mlm", "electra"])
def test_unpadded_batches_take_the_flash_kernel_inside_the_compiled_step(tokenizer, name):
    """With only the flash backend allowed, the compiled fast step trains on unpadded blocks (dropout on); a padded
    batch, whose mask flash cannot take, is refused by SDPA, so the first check is not vacuous."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    objective, model = setup(tokenizer, name)
    eager_model, eager_objective = copy.deepcopy(model).cuda(), copy.deepcopy(objective).cuda()
    fuse_encoders(eager_objective.encoders(eager_model))
    apply_fast_path(model, objective, 64)
    module = PretrainModule(model, objective).cuda()
    compile_step(module)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch in batches(tokenizer, objective, 2):
            out = module(to_device(batch, "cuda"))
            out["loss"].backward()
            assert torch.isfinite(out["loss"])
        padded = to_device(batches(tokenizer, objective, 1, padded=True)[0], "cuda")
        with pytest.raises(RuntimeError, match="No available kernel"):
            eager_objective(eager_model, padded)


@pytest.mark.parametrize("name", ["mlm", "electra"])
def test_fast_path_bf16_loss_matches_the_stock_model(tokenizer, name):
    """Eval mode (no dropout), the same batch: the fast path's MLM (generator) loss equals the stock HF model's
    full-vocabulary loss within bf16 rounding (8 mantissa bits: relative 2**-8 per operation, a few percent of a
    loss near ln(V) at most after the encoder's layers)."""
    objective, model = setup(tokenizer, name)
    stock = copy.deepcopy(model).cuda().eval()
    apply_fast_path(model, objective, 64)
    module = PretrainModule(model, objective).cuda().eval()
    compile_step(module)
    batch = to_device(batches(tokenizer, objective, 1)[0], "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = module(batch)["gen_loss" if name == "electra" else "mlm_loss"].float()
        hf = stock.generator if name == "electra" else stock
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"]).loss.float()
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=0.0)


@pytest.mark.parametrize("objective_name, mode", [("electra", "local"), ("span", "synthetic")])
def test_compiled_decoupled_chunks_train_on_the_gpu_like_the_eager_ones(tokenizer, objective_name, mode):
    """Two chunks in one process (simulated runtime), bf16, dropout 0, 3 optimizer steps of 2 micro-batches: the
    fast chunks (static shapes, fused layers, each chunk compiled) train, and their first-step losses, from the same
    weights, equal the eager chunks' within bf16 rounding (as the stock-model comparison above)."""
    from pretrain.config import config_from_dict
    from pretrain.decouple.pipeline import Pipeline
    from pretrain.decouple.run import build_chunked_model
    from pretrain.decouple.layout import Layout
    from pretrain.decouple.pipeline import window_normalizers
    from pretrain.fast import apply_fast_path_to_chunks

    cfg = config_from_dict({
        "output_dir": "unused",
        "data": {"files": ["in-memory"], "block_size": 64, "num_workers": 0},
        "model": {**MODEL, "num_layers": 4, "max_position_embeddings": 128, "hidden_dropout": 0.0,
                  "attention_dropout": 0.0},
        "objective": {"name": objective_name, objective_name: OPTIONS[objective_name]},
        "decouple": {"mode": mode, "chunks": 2},
        "train": {"micro_batch_size": 8, "grad_accum": 2, "max_steps": 3, "lr": 1e-3, "warmup_steps": 0,
                  "device": "cuda", "precision": "bf16"},
        "log": {"tensorboard": False},
    })
    key = "gen_loss" if objective_name == "electra" else "mlm_loss"
    device = torch.device("cuda")
    losses = {}
    for fast in (False, True):
        torch.manual_seed(0)
        model, collator = build_chunked_model(cfg, tokenizer, torch.ones(len(tokenizer)))
        model.to(device)
        if fast:
            apply_fast_path_to_chunks(model, 64)
        pipeline = Pipeline(model, cfg, Layout("simulated", 2, 1, 0), device)
        data = batches(tokenizer, collator, 6)
        losses[fast] = []
        for step in range(3):
            micro = data[2 * step: 2 * step + 2]
            pipeline.train_step(micro, window_normalizers(collator, micro, device), 1e-3, step)
            losses[fast].append(pipeline.gather_metrics()[key])
    assert all(torch.isfinite(torch.tensor(losses[True])))
    assert losses[True][0] == pytest.approx(losses[False][0], rel=2e-2)
