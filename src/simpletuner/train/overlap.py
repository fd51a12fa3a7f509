"""Gradient averaging over processes that overlaps the backward pass (replicated training).

The trained parameters are split once into buckets of about `bucket_bytes`, in reverse order (the
order backward finishes them, roughly, as DDP does). In the backward of an update's last micro-batch,
each parameter's post-accumulate hook marks it ready; a bucket whose parameters are all ready is
flattened and all-reduced asynchronously while backward goes on, and buckets are launched in index
order on every process, so the collectives match. `finish` launches what is left (buckets with a
parameter that got no gradient), waits, and writes the averages back.

Each element is summed over the same processes as one flat all-reduce would sum it, then divided
by the number of processes: with two processes the result is bit-identical to the flat path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


class OverlappedReducer:
    """Buckets of parameters whose gradients are all-reduced as backward produces them."""

    def __init__(self, parameters: list[nn.Parameter], world: int, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world, self.syncing = world, False
        self.buckets: list[list[nn.Parameter]] = _buckets(list(reversed(parameters)), bucket_bytes)
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._pending: list[tuple[list[torch.Tensor], torch.Tensor, Any]] = []
        self._launched = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in parameters]

    def _on_grad(self, parameter: nn.Parameter) -> None:
        if not self.syncing:
            return
        self._ready[self._bucket_of[id(parameter)]].add(id(parameter))
        while self._launched < len(self.buckets) and len(self._ready[self._launched]) == len(
                self.buckets[self._launched]):
            self._launch(self._launched)

    def _launch(self, index: int) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors

        grads = [p.grad for p in self.buckets[index] if p.grad is not None]
        self._launched = index + 1
        if grads:
            flat = _flatten_dense_tensors(grads)
            self._pending.append((grads, flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Launch the buckets not launched yet, wait for every reduction, and write the averages back."""
        from torch._utils import _unflatten_dense_tensors

        while self._launched < len(self.buckets):
            self._launch(self._launched)
        for grads, flat, work in self._pending:
            work.wait()
            flat /= self.world
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
        self._pending, self._launched = [], 0
        self._ready = [set() for _ in self.buckets]
        self.syncing = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _buckets(parameters: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for parameter in parameters:
        if buckets[-1] and size + parameter.numel() * parameter.element_size() > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(parameter)
        size += parameter.numel() * parameter.element_size()
    return [bucket for bucket in buckets if bucket]
