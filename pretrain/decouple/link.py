"""Point-to-point messages between the processes of one pipeline (``torch.distributed`` send/recv; gloo on CPU,
NCCL on CUDA): activations up, true gradients down (synthetic mode), small JSON objects (metrics, notes) up."""

from __future__ import annotations

import collections
import json

import torch

from .layout import Layout

#: message tags: activations (train and eval, in program order), metric dicts, "chunk saved" notes, true gradients
#: of a chunk's input (synthetic mode, micro-batch order)
TAG_ACTIVATION, TAG_METRICS, TAG_SAVED, TAG_GRADIENT = 1, 2, 3, 4


class Link:
    """Sends and receives between this process and the others of its pipeline. Sends are asynchronous: a process
    only waits when more than ``max_in_flight`` of its sends are outstanding (that bounds how far it runs ahead)."""

    def __init__(self, layout: Layout, device: torch.device, max_in_flight: int = 4):
        self.layout, self.device, self.max_in_flight = layout, device, max_in_flight
        self.pending: collections.deque = collections.deque()

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        import torch.distributed as dist

        self.pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))  # keep the tensor alive until sent
        while len(self.pending) > self.max_in_flight:
            self.pending.popleft()[0].wait()

    def _recv(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=src, tag=tag)
        return buf

    def send_activations(self, outputs: dict[str, torch.Tensor], chunk: int) -> None:
        """``outputs`` of ``chunk`` to ``chunk + 1``: the hidden states (fp32) and carried tensors, in key order."""
        for key in sorted(outputs):
            self._isend(outputs[key].contiguous(), self.layout.rank_of(chunk + 1), TAG_ACTIVATION)

    def recv_activations(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], chunk: int) -> dict:
        """What ``chunk - 1`` sent; ``spec``: key -> (shape, dtype), known from the batch every process holds."""
        src = self.layout.rank_of(chunk - 1)
        return {key: self._recv(*spec[key], src=src, tag=TAG_ACTIVATION) for key in sorted(spec)}

    def send_gradient(self, grad: torch.Tensor, chunk: int) -> None:
        """The true gradient of ``chunk``'s input (fp32 [B, L, H]) to ``chunk - 1`` (synthetic mode)."""
        self._isend(grad.float().contiguous(), self.layout.rank_of(chunk - 1), TAG_GRADIENT)

    def recv_gradient(self, shape, chunk: int) -> torch.Tensor:
        """The true gradient of ``chunk``'s output, from ``chunk + 1``."""
        return self._recv(shape, torch.float32, self.layout.rank_of(chunk + 1), TAG_GRADIENT)

    def send_object(self, obj, dst_chunk: int, tag: int) -> None:
        """A small JSON-able object (metrics, notes) to the holder of ``dst_chunk``: length, then UTF-8 bytes."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device)
        dst = self.layout.rank_of(dst_chunk)
        self._isend(torch.tensor([data.numel()], dtype=torch.long, device=self.device), dst, tag)
        self._isend(data, dst, tag)

    def recv_object(self, src_chunk: int, tag: int):
        src = self.layout.rank_of(src_chunk)
        n = int(self._recv((1,), torch.long, src, tag).item())
        return json.loads(bytes(self._recv((n,), torch.uint8, src, tag).cpu().numpy()).decode())

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft()[0].wait()
