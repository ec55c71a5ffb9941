"""Run under torchrun: two accumulation windows of two micro-batches on the eager or the fast path (the DDP wrapper
compiled by ``compile_step``); rank 0 saves the second window's gradients and loss."""

import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, sys.argv[3])
from helpers import make_tokenizer, packed_examples, tiny_model_config  # noqa: E402

from objectives import get_objective  # noqa: E402
from pretrain.data.stream import StreamBatchSampler  # noqa: E402
from pretrain.fast import apply_fast_path, compile_step  # noqa: E402
from pretrain.trainer import PretrainModule, accumulate_gradients  # noqa: E402


def main(mode: str, out_path: str):
    accelerator = Accelerator(cpu=True)
    tok = make_tokenizer()
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 16, length=32))]
    torch.manual_seed(0)
    obj = get_objective("mlm", tok, seed=1, static_count=True)
    model = obj.build_model(tiny_model_config())  # dropout 0: both paths compute the same function
    if mode == "fast":
        apply_fast_path(model, obj, 32)
    module = accelerator.prepare(PretrainModule(model, obj))
    if mode == "fast":
        compile_step(module)
    sampler = iter(StreamBatchSampler(4, accelerator.num_processes, accelerator.process_index))
    micro = [obj.collate([examples[p] for p in next(sampler)]) for _ in range(2)]
    for _ in range(2):  # the second window starts from zeroed gradients: no state left behind by the first
        module.zero_grad(set_to_none=True)
        outs = accumulate_gradients(module, obj, micro, accelerator)
    if accelerator.is_main_process:
        grads = {n: p.grad.clone() for n, p in module.module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": float(outs[0]["loss"])}, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
