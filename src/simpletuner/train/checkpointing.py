"""Activation checkpointing of every n-th block (SimpleTuner's gradient_checkpointing_interval).

diffusers' models call `_gradient_checkpointing_func(block, *args)` once per block when
checkpointing is on; this function checkpoints calls 0, n, 2n, ... of each forward pass and runs
the others as usual, so n = 1 recomputes every block and larger n keeps more activations and
recomputes less. The maths is unchanged: only where activations live differs.

Blocks under block swap (train/block_swap.py) recompute themselves; this function calls them as they are.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint


class EveryNthBlock:
    """A gradient-checkpointing function for diffusers that checkpoints every `interval`-th block call."""

    def __init__(self, interval: int, self_checkpointed: Collection[Any] = ()) -> None:
        if interval < 1:
            raise ValueError(f"gradient_checkpointing_interval must be at least 1, got {interval}")
        self.interval = interval
        self.self_checkpointed = self_checkpointed  # blocks that checkpoint themselves (block swap)
        self.calls = 0
        self.checkpointed = 0

    def reset(self, *_: Any) -> None:
        """Start counting blocks again (a forward pre-hook of the model)."""
        self.calls = 0

    def __call__(self, block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        index, self.calls = self.calls, self.calls + 1
        if index % self.interval or block in self.self_checkpointed:
            return block(*args, **kwargs)
        self.checkpointed += 1
        return checkpoint(block, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module, interval: int | None = None,
                         self_checkpointed: Collection[Any] = ()) -> EveryNthBlock | None:
    """Turn on the model's gradient checkpointing, for every block or (with `interval`) every n-th block,
    leaving the blocks in `self_checkpointed` to checkpoint themselves. Models without diffusers'
    checkpointing are left as they are (returns None)."""
    if not hasattr(model, "enable_gradient_checkpointing"):
        return None
    if (not interval or interval == 1) and not self_checkpointed:
        model.enable_gradient_checkpointing()
        return None
    function = EveryNthBlock(interval or 1, self_checkpointed)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=function)
    model.register_forward_pre_hook(function.reset)
    return function


__all__ = ["EveryNthBlock", "enable_checkpointing"]
