"""Overlapping local updates (``decouple.mode: local`` with ``decouple.overlap: M``; Laskin et al. 2020, after LoCo,
Xiong et al. 2020): the M layers just below each boundary are shared by the two local losses around it.

Layers keep one owner: the top M layers of chunk k belong to chunk k (its parameters, optimizer, checkpoint files),
and chunk k computes them once, forward. Chunk k+1's loss reaches them through the boundary: chunk k+1 treats its
input h_b [B, L, H] as a leaf, and after its backward pass sends ∂L_{k+1}/∂h_b down; chunk k backpropagates that
gradient through its top M layers only (``inputs=`` the shared parameters: nothing below them, and not its input),
adding it to their gradients from its own loss before its optimizer step. So chunk k's loss reaches its own layers
and the M shared layers below its input, and nothing else (the isolation invariant, restated).

Cost per micro-batch and boundary: one extra backward pass of M layers on chunk k, the gradient of chunk k+1's
input (part of its first layer's backward), one [B, L, H] fp32 message down. Schedule: chunk k keeps each
micro-batch's graph until the gradient from above arrives and takes it right after computing the next micro-batch
(``LEAD``: chunk k runs at most one micro-batch ahead of chunk k+1 and holds at most two graphs), and every window
drains: chunk k waits for its last gradient before the update, so a checkpoint never holds a half-finished exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stage import Stage

#: micro-batches chunk k computes before it must take the gradient of the oldest one from chunk k+1
LEAD = 1


@dataclass
class Shared:
    """A micro-batch whose gradient from the chunk above is still due: its running index and the chunk's
    output [B, L, H] with the graph of the chunk's forward pass (freed by :meth:`OverlapStage.resolve`)."""

    index: int
    hidden: torch.Tensor


class OverlapStage(Stage):
    """A chunk of overlapping local updates: :class:`~pretrain.decouple.stage.Stage` plus the gradient exchange at
    the M shared layers. Chunks k > 0 put the gradient of their input into ``outbox`` (for chunk k-1); chunks
    k < K-1 keep their output's graph in ``pending`` until :meth:`resolve` gets chunk k+1's gradient."""

    def __init__(self, model, k: int, cfg, device: torch.device, replica: int = 0):
        super().__init__(model, k, cfg, device, replica)
        m = cfg.decouple.overlap
        #: parameters of this chunk's top M layers, trained by the loss of chunk k+1 too (none on the last chunk)
        self.shared = [] if self.chunk.is_final else [p for layer in self.chunk.layers[-m:] for p in layer.parameters()]
        self.seen = 0

    @staticmethod
    def messages_down(cfg) -> int:
        """Gradients to the chunk below in flight: the window's last LEAD + 1 micro-batches', twice for slack."""
        return 2 * (LEAD + 1)

    def begin_window(self, step: int | None) -> bool:
        """Every window drains: the shared layers' update needs the window's gradients from the chunk above."""
        return True

    def forward_backward(self, batch, inputs, normalizers, autocast) -> dict[str, torch.Tensor]:
        leaf = None
        with self.rng.active():
            if self.k > 0:  # the gradient at the input is what chunk k-1's shared layers receive
                leaf = inputs["hidden"].detach().requires_grad_()
                inputs = {**inputs, "hidden": leaf}
            with autocast():
                outputs, out = self.chunk(batch, inputs, normalizers, boundary_grads=True)
            # the gradient from above comes later: keep the chunk's graph until then (the head's part goes with out)
            out["loss"].backward(retain_graph=bool(self.shared))
        self.tracker.add(out)
        if leaf is not None:
            self.outbox.append(leaf.grad.detach())
        if self.shared:
            self.pending.append(Shared(self.seen, outputs["hidden"]))
        self.seen += 1
        return {**outputs, "hidden": outputs["hidden"].detach()}

    def due(self) -> int:
        """Pending micro-batches at least LEAD older than the newest one."""
        return sum(1 for e in self.pending if e.index <= self.seen - 1 - LEAD)

    def next_shape(self) -> torch.Size:
        return self.pending[0].hidden.shape

    def resolve(self, delta: torch.Tensor) -> None:
        """``delta`` = ∂L_{k+1}/∂(this chunk's output) of the oldest pending micro-batch: backpropagate it through
        the shared layers only, accumulating into their gradients; free the graph."""
        entry = self.pending.popleft()
        torch.autograd.backward(entry.hidden, delta, inputs=self.shared)

    def save(self, directory) -> None:
        if self.pending:
            raise RuntimeError(f"chunk {self.k} saves with {len(self.pending)} gradients from chunk {self.k + 1} "
                               "outstanding: the pipeline drains every window")
        super().save(directory)


__all__ = ["OverlapStage", "LEAD"]
