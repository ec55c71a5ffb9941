"""Token-exact gradients: accumulation and data parallelism give the gradient of one big batch."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from distributed import torchrun
from helpers import make_tokenizer, packed_examples, tiny_model_config
from objectives import get_objective
from pretrain.steps.backprop import PretrainModule, accumulate_gradients

TESTS = Path(__file__).parent


def grads_after(objective_name, micro_batches_of_examples):
    tok = make_tokenizer()
    torch.manual_seed(0)
    obj = get_objective(objective_name, tok, seed=1)
    module = PretrainModule(obj.build_model(tiny_model_config()), obj)
    accelerator = Accelerator(cpu=True)
    module = accelerator.prepare(module)
    batches = [obj.collate(m) for m in micro_batches_of_examples]
    accumulate_gradients(module, obj, batches, accelerator)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective_name", ["mlm", "span", "electra"])
def test_accumulating_4x2_equals_1x8(objective_name):
    tok = make_tokenizer()
    ex = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 8, length=32))]
    big = grads_after(objective_name, [ex])
    small = grads_after(objective_name, [ex[0:2], ex[2:4], ex[4:6], ex[6:8]])
    assert big.keys() == small.keys() and len(big) > 10
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("objective_name", ["mlm", "span", "electra"])
def test_two_gloo_processes_equal_one_with_double_batch(objective_name, tmp_path):
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    torchrun(2, str(TESTS / "dist" / "grad_worker.py"), objective_name, str(two), str(TESTS))
    torchrun(1, str(TESTS / "dist" / "grad_worker.py"), objective_name, str(one), str(TESTS))
    a, b = torch.load(two)["grads"], torch.load(one)["grads"]
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
