"""Run under torchrun: each rank computes gradients on its share of a global batch; rank 0 saves them."""

import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, sys.argv[3])
from helpers import make_tokenizer, packed_examples, tiny_model_config  # noqa: E402

from objectives import get_objective  # noqa: E402
from pretrain.data.stream import StreamBatchSampler  # noqa: E402
from pretrain.trainer import PretrainModule, accumulate_gradients  # noqa: E402


def main(objective_name: str, out_path: str):
    accelerator = Accelerator(cpu=True)
    tok = make_tokenizer()
    examples = [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 16, length=32))]
    torch.manual_seed(0)
    obj = get_objective(objective_name, tok, seed=1)
    model = obj.build_model(tiny_model_config())
    module = accelerator.prepare(PretrainModule(model, obj))
    sampler = StreamBatchSampler(8 // accelerator.num_processes, accelerator.num_processes, accelerator.process_index)
    positions = next(iter(sampler))  # global micro-batch 0: this rank's share
    batch = obj.collate([examples[p] for p in positions])
    outs = accumulate_gradients(module, obj, [batch], accelerator)
    if accelerator.is_main_process:
        grads = {n: p.grad.clone() for n, p in module.module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": float(outs[0]["loss"])}, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
