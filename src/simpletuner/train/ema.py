"""Exponential moving average of the trainable weights, for smoother validation and export.

The average starts as a copy of the weights and moves towards them by `1 - decay` every
`update_every` optimiser steps. It may live on another device than the weights (the CPU, to
save accelerator memory); it is kept in float32 whatever the weights' precision. Of weights
sharded over the processes (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions) each process averages
its own shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """Shadow copies of `parameters`, moved towards them by `update(step)`."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        decay: float,
        update_every: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie strictly between 0 and 1, got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update interval must be at least 1, got {update_every}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.update_every = update_every
        self.updates = 0
        self.shadow = [_local(p).detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                       for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Move the average towards the current weights if `step` (counted from 1) is due; say if it was."""
        if step % self.update_every:
            return False
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(_local(param).detach().to(shadow.device, torch.float32), 1.0 - self.decay)
        self.updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter] | None = None) -> None:
        """Write the averaged weights into `parameters` (by default the followed ones)."""
        targets = self.parameters if parameters is None else list(parameters)
        for shadow, param in zip(self.shadow, targets, strict=True):
            _local(param).copy_(shadow.to(param.device, param.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block, the followed parameters hold the averaged weights (for validation)."""
        saved = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, saved):
                    param.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "update_every": self.update_every, "updates": self.updates,
                "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.parameters):
            raise ValueError(f"ema state holds {len(shadow)} tensors, the model trains {len(self.parameters)}")
        for mine, saved in zip(self.shadow, shadow):
            if mine.shape != saved.shape:
                raise ValueError(f"ema state holds a tensor of shape {tuple(saved.shape)} where the model "
                                 f"trains one of {tuple(mine.shape)}")
            mine.copy_(saved)
        self.updates = state["updates"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded weight (FSDP2's DTensor, DeepSpeed ZeRO-3's flat partition `ds_tensor`),
    sharing its storage; a plain tensor as it is."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor
