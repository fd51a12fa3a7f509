"""Speed levers of the training step: regional torch.compile, channels_last and the SDPA backend.

Each option is `auto`, true/false (the attention backend: a kernel's name). `auto` turns a lever on
only where it is known to help and to work:

- `torch_compile`: on CUDA. The repeated blocks are compiled (diffusers' `compile_repeated_blocks`,
  one compiled code object serving every block of a class), or the whole model when it names none.
  Off on CPU: the compile takes longer than the short runs a CPU trains, and no CPU win is measured.
- `channels_last`: for UNets (a model with a convolutional `conv_in`) on CUDA, where convolutions in
  that layout run on the tensor cores' fast path; off for transformers (nothing to gain) and on CPU.
- `attention_backend`: `auto` leaves the choice to PyTorch's SDPA (it takes flash attention where the
  inputs allow, then memory-efficient, then math); a name restricts SDPA to that kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

logger = get_logger(__name__)

BACKENDS = ("flash", "cudnn", "efficient", "math")
_CUDA_ONLY = ("cudnn", "efficient")


@dataclass(frozen=True)
class Levers:
    """The levers as resolved for one model on one device."""

    compile: bool
    channels_last: bool
    attention: str | None  # a name of BACKENDS; None: SDPA chooses


def resolve_levers(cfg: Any, model: nn.Module, device: torch.device) -> Levers:
    """What the options ask for on this device; raises ConfigError for a kernel the device lacks."""
    cuda = device.type == "cuda"
    unet = isinstance(getattr(model, "conv_in", None), nn.Conv2d)
    attention = None if cfg.attention_backend == "auto" else cfg.attention_backend
    if attention in _CUDA_ONLY and not cuda:
        raise ConfigError(f"attention_backend {attention!r} needs a CUDA device (this run is on {device.type}); "
                          "use auto, flash or math")
    return Levers(compile=cuda if cfg.torch_compile == "auto" else bool(cfg.torch_compile),
                  channels_last=(cuda and unet) if cfg.channels_last == "auto" else bool(cfg.channels_last) and unet,
                  attention=attention)


def apply_levers(model: nn.Module, levers: Levers, skip: Collection[nn.Module] = ()) -> None:
    """Put the model in channels_last and compile its repeated blocks, as `levers` says. Blocks in `skip`
    (under block swap, which swaps their weights while they run) are not compiled, nor is the whole model."""
    if levers.channels_last:
        model.to(memory_format=torch.channels_last)
    if levers.compile:
        repeated = getattr(model, "_repeated_blocks", None)
        if skip:  # diffusers' compile_repeated_blocks (the classes of the swapped blocks too), less the skipped
            classes = set(repeated or ()) | {type(block).__name__ for block in skip}
            for block in model.modules():
                if type(block).__name__ in classes and block not in skip:
                    block.compile()
            logger.info("torch.compile: the blocks %s but the swapped ones", ", ".join(sorted(classes)))
        elif repeated and hasattr(model, "compile_repeated_blocks"):
            model.compile_repeated_blocks()
            logger.info("torch.compile: the repeated blocks %s", ", ".join(model._repeated_blocks))
        else:
            model.compile()
            logger.info("torch.compile: the whole %s (it names no repeated blocks)", type(model).__name__)


def attention_context(levers: Levers | None) -> ContextManager[Any]:
    """The SDPA kernel the step's forward and backward use: the chosen one, or SDPA's own choice."""
    if levers is None or levers.attention is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[levers.attention]
    return sdpa_kernel([kernel])
