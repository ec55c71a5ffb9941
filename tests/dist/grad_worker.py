"""Run under torchrun: each rank computes gradients on its share of a global batch; rank 0 saves them.

    grad_worker.py OBJECTIVE OUT TESTS_DIR [eager|fast] [MICRO_BATCHES]

``fast``: the fast path with the DDP wrapper compiled (``compile_step``). The window of MICRO_BATCHES (default 1)
runs twice from zeroed gradients, so state left behind by the first window would show."""

import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, sys.argv[3])
from helpers import make_tokenizer, packed_examples, tiny_model_config  # noqa: E402

from objectives import get_objective  # noqa: E402
from pretrain.data.stream import StreamBatchSampler  # noqa: E402
from pretrain.fast import apply_fast_path, compile_step  # noqa: E402
from pretrain.steps.backprop import PretrainModule, accumulate_gradients  # noqa: E402


def main(objective_name: str, out_path: str, mode: str = "eager", n_micro: int = 1):
    accelerator = Accelerator(cpu=True)
    tok = make_tokenizer()
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 16, length=32))]
    torch.manual_seed(0)
    obj = get_objective(objective_name, tok, seed=1)
    model = obj.build_model(tiny_model_config())  # dropout 0: eager and fast compute the same function
    if mode == "fast":
        apply_fast_path(model, obj, 32)
    module = accelerator.prepare(PretrainModule(model, obj))
    if mode == "fast":
        compile_step(module)
    sampler = iter(StreamBatchSampler(8 // accelerator.num_processes, accelerator.num_processes,
                                      accelerator.process_index))
    micro = [obj.collate([examples[p] for p in next(sampler)]) for _ in range(n_micro)]  # this rank's shares
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        outs = accumulate_gradients(module, obj, micro, accelerator)
    if accelerator.is_main_process:
        grads = {n: p.grad.clone() for n, p in module.module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": float(outs[0]["loss"])}, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[4:5], *map(int, sys.argv[5:6]))
