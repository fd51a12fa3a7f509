"""Block swap (SimpleTuner's `musubi_blocks_to_swap`): the frozen weights of the denoiser's last blocks
wait in CPU memory and visit the accelerator only while their block runs.

Each swapped block's frozen parameters (the base weights, quantised or not) live on the CPU; plain ones
are pinned when the accelerator is CUDA, so their copies are asynchronous. A LoRA's or LyCORIS' own weights, which
train, stay on the accelerator. When the block runs, its frozen weights are copied to the accelerator,
the block's forward uses the copies, and the copies are dropped when it returns:

- with gradients, the block's forward runs without building a graph, so nothing holds the copies after
  it; its inputs are kept. The backward copies the weights again, runs the block again with the same
  inputs, autocast and random state, and back-propagates through that run (`Recompute`, what PyTorch's
  reentrant checkpoint does, written out because every tensor in the block's keyword arguments needs its
  gradient, and non-reentrant checkpointing would keep the copies alive through layers that store
  their weight on the autograd context themselves, as bitsandbytes' 4-bit matmul does);
- without gradients (validation), the copies live for the block's forward only.

So at most one swapped block's weights are on the accelerator at a time. The price is the copies: two
per swapped block per training step (forward, recompute), made on the compute stream, so they are not
overlapped with compute. The maths is unchanged: gradients equal those of the unswapped model
(tests/test_block_swap.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from simpletuner.errors import ConfigError


def denoiser_blocks(model: nn.Module, block_lists: tuple[str, ...]) -> list[nn.Module]:
    """The model's repeated blocks in the order they run: the members of its `block_lists`, list by list."""
    return [block for name in block_lists for block in getattr(model, name)]


def _home(tensor: torch.Tensor, pin: bool) -> nn.Parameter:
    """A frozen parameter's CPU copy; plain tensors pinned when `pin`. Quantised ones keep their own type
    (their `to` moves their scales too; bitsandbytes' 4-bit parameter keeps its quantisation state)."""
    moved = tensor.to("cpu")
    if pin and type(moved) is torch.Tensor:
        moved = moved.pin_memory()
    return moved if isinstance(moved, nn.Parameter) else nn.Parameter(moved, requires_grad=False)


@dataclass
class SwappedBlock:
    """One block whose frozen parameters wait on the CPU; calling it runs the block with them on `device`."""

    block: nn.Module
    device: torch.device
    frozen: list[tuple[nn.Module, str]] = field(default_factory=list)  # (owning module, parameter name)
    on_copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # sees (home, copy) of every copy (tests)

    def __post_init__(self) -> None:
        self.forward = self.block.forward  # the block's own forward, called with the copies in place
        pin = self.device.type == "cuda"
        for module in self.block.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and not param.requires_grad:
                    module._parameters[name] = _home(param, pin)
                    self.frozen.append((module, name))
        self.block.forward = self.__call__

    @property
    def frozen_bytes(self) -> int:
        return sum(_nbytes(module._parameters[name]) for module, name in self.frozen)

    @contextmanager
    def resident(self) -> Iterator[None]:
        """The frozen parameters replaced by copies on `device` for the block's duration."""
        homes = [module._parameters[name] for module, name in self.frozen]
        try:
            for (module, name), home in zip(self.frozen, homes):
                copy = _device_copy(home, self.device)
                if self.on_copy is not None:
                    self.on_copy(home, copy)
                module._parameters[name] = copy  # not a Parameter: the copy never trains
            yield
        finally:
            for (module, name), home in zip(self.frozen, homes):
                module._parameters[name] = home

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        with self.resident():
            return self.forward(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._run(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        call = _Call(self, spec, leaves)
        # an input that requires a gradient, so that the output joins the graph (and its backward runs) even when
        # no input of the block requires one: the block's trained weights are not inputs of the Function
        anchor = torch.empty(0, requires_grad=True)
        return call.rebuild_outputs(Recompute.apply(call, anchor, *call.tensors))


_TENSOR = object()  # marks where a tensor stood in a block's output (which may hold None, as SD3's last block's does)


@dataclass
class _Call:
    """One call of a swapped block: its arguments (tensors apart), and how to put its outputs back together."""

    swapped: SwappedBlock
    spec: Any  # pytree spec of (args, kwargs)
    leaves: list[Any]
    output_spec: Any = None
    output_template: list[Any] = field(default_factory=list)  # the output's leaves, _TENSOR for each tensor

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor)]

    def run(self, tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
        """Run the block on the given tensors in place of the call's; returns the tensors of its output (and
        keeps the output's structure, without its tensors)."""
        leaves = [next(tensors) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        args, kwargs = tree_unflatten(leaves, self.spec)
        output_leaves, self.output_spec = tree_flatten(self.swapped._run(*args, **kwargs))
        self.output_template = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in output_leaves]
        return [leaf for leaf in output_leaves if isinstance(leaf, torch.Tensor)]

    def rebuild_outputs(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        given = iter(tensors)
        leaves = [next(given) if leaf is _TENSOR else leaf for leaf in self.output_template]
        return tree_unflatten(leaves, self.output_spec)


class Recompute(torch.autograd.Function):
    """A swapped block's forward without a graph; its backward runs the block again and back-propagates."""

    @staticmethod
    def forward(ctx: Any, call: _Call, _anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = call.swapped.device
        ctx.call, ctx.device = call, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return tuple(call.run(iter(tensors)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.call.run(iter(inputs))
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad and grad is not None]
        if pairs:  # accumulates into the block's trained weights (LoRA, LyCORIS) and the inputs' .grad
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        ctx.call = None  # nothing of this call outlives its backward
        return (None, None, *(t.grad if t.requires_grad else None for t in inputs))


def _device_copy(home: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `home` on `device`. bitsandbytes' 4-bit parameter takes no `copy` argument; on another device
    its `to` copies (data and quantisation state) all the same."""
    if hasattr(home, "quant_state"):
        return home.to(device, non_blocking=True)
    return home.to(device, non_blocking=True, copy=True)


def _nbytes(tensor: torch.Tensor) -> int:
    inner = [getattr(tensor, name) for name in ("_data", "_scale", "_shift")
             if torch.is_tensor(getattr(tensor, name, None))]
    if inner:  # a quantised tensor: its storage is its parts
        return sum(_nbytes(part) for part in inner)
    return tensor.numel() * tensor.element_size()


@dataclass
class BlockSwap:
    """The swapped blocks of one model."""

    blocks: list[SwappedBlock]

    def __contains__(self, block: object) -> bool:
        return any(swapped.block is block for swapped in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[nn.Module]:
        return (swapped.block for swapped in self.blocks)

    @property
    def frozen_bytes(self) -> int:
        """Bytes of frozen weights kept off the accelerator."""
        return sum(swapped.frozen_bytes for swapped in self.blocks)


def swap_blocks(model: nn.Module, block_lists: tuple[str, ...], count: int, device: torch.device) -> BlockSwap:
    """Keep the frozen weights of the last `count` of the model's blocks on the CPU (see the module's text).

    Call it once the adapter is attached and the model is on `device`, before the optimiser is built."""
    blocks = denoiser_blocks(model, block_lists)
    if count > len(blocks):
        raise ConfigError(f"musubi_blocks_to_swap={count} is more than the {len(blocks)} blocks of "
                          f"{type(model).__name__} ({', '.join(block_lists)}); use at most {len(blocks)}")
    return BlockSwap([SwappedBlock(block, device) for block in blocks[len(blocks) - count:]])


__all__ = ["BlockSwap", "Recompute", "SwappedBlock", "denoiser_blocks", "swap_blocks"]
