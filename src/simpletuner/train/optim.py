"""Optimisers: build the one the configuration names, from the package that provides it.

Parameters with fewer than two dimensions (biases, norm scales, DoRA magnitudes) get no weight
decay. Optional optimisers are imported only when chosen; a missing package is a UserError that
says what to install.

adamw_bf16 (SimpleTuner's default) trains bf16 weights: torch-optimi's AdamW with Kahan-compensated
updates, so steps smaller than a bf16 weight's precision accumulate instead of being rounded away.
`trained_weight_dtype` tells the trainer which dtype the trainable weights must have.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError

# optimizer name -> (module to import, pip package that provides it)
_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "adafactor": ("transformers.optimization", "transformers"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "adamw_schedulefree": ("schedulefree", "schedulefree"),
    "adamw_bf16": ("optimi", "torch-optimi"),
    "optimi-adamw": ("optimi", "torch-optimi"),
    "optimi-lion": ("optimi", "torch-optimi"),
}
# optimizer name -> the dtype its trainable weights must have (others keep the trainer's fp32 weights)
_WEIGHT_DTYPES = {"adamw_bf16": torch.bfloat16}


def trained_weight_dtype(cfg: TrainingConfig) -> torch.dtype | None:
    """The dtype the optimiser needs the trainable weights in, or None where any dtype is fine."""
    return _WEIGHT_DTYPES.get(cfg.optimizer)


def parameter_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group (matrices) and an undecayed one (vectors)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise UserError("nothing to train: no parameter requires a gradient (check model_type and the LoRA targets)")
    decayed = [p for p in trainable if p.ndim >= 2]
    undecayed = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _import(optimizer: str) -> Any:
    module, package = _PACKAGES[optimizer]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"optimizer={optimizer!r} needs the {package!r} package, which is not installed: "
            f"`pip install {package}`, or choose optimizer='adamw' ({error})"
        ) from error


def with_learning_rate(groups: list[dict[str, Any]], chosen: Iterable[nn.Parameter],
                       lr: float) -> list[dict[str, Any]]:
    """Each group split in two: the `chosen` parameters (own group, learning rate `lr`) and the rest."""
    ids = {id(p) for p in chosen}
    split = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in ids]
        picked = [p for p in group["params"] if id(p) in ids]
        split += [{**group, "params": rest}, {**group, "params": picked, "lr": lr}]
    return [group for group in split if group["params"]]


def build_optimizer(
    params: nn.Module | Iterable[nn.Parameter], cfg: TrainingConfig, device_type: str,
    text_encoder_params: Iterable[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """The optimiser named by `cfg.optimizer` over the trainable parameters of `params`.

    `device_type` is where the parameters live ("cuda", "cpu", "mps"): AdamW is fused as `adamw_fused` says.
    `text_encoder_params` train at cfg.text_encoder_lr when it is set.
    Schedule-free AdamW keeps its own warm-up (cfg.lr_warmup_steps) and must be switched with
    `set_train_mode` around validation and export.
    """
    groups = parameter_groups(params, cfg.adam_weight_decay)
    if cfg.text_encoder_lr is not None:  # train_text_encoder: the encoders' own learning rate
        groups = with_learning_rate(groups, text_encoder_params, cfg.text_encoder_lr)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    lr = cfg.learning_rate
    name = cfg.optimizer
    if name == "adamw":
        fused = adamw_fused(cfg, device_type)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon, fused=fused or None)
    module = _import(name)
    if name == "adamw8bit":
        return module.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon)
    if name == "adafactor":
        # A fixed learning rate driven by our LR scheduler, not Adafactor's own relative step.
        return module.Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "prodigy":
        return module.Prodigy(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon, safeguard_warmup=True,
                              use_bias_correction=True)
    if name == "lion":
        return module.Lion(groups, lr=lr, betas=betas)
    if name == "adamw_bf16":
        _check_dtype(groups, torch.bfloat16, name)
        return module.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon, kahan_sum=True)
    if name == "optimi-adamw":  # Kahan summation where weights are bf16/fp16 (optimi's default)
        return module.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon)
    if name == "optimi-lion":
        return module.Lion(groups, lr=lr, betas=betas)
    if name == "adamw_schedulefree":
        optimizer = module.AdamWScheduleFree(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon,
                                             warmup_steps=cfg.lr_warmup_steps)
        optimizer.train()
        return optimizer
    raise UserError(f"optimizer={name!r} is unknown; accepted: adamw, {', '.join(_PACKAGES)}")


def adamw_fused(cfg: TrainingConfig, device_type: str) -> bool:
    """Whether AdamW takes PyTorch's fused step: `adamw_fused` (auto: wherever PyTorch has the kernel).

    Fused is the fastest step PyTorch has on CUDA and on the CPU alike (benchmarks/RESULTS.md).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = device_type in _get_fused_kernels_supported_devices()
    if cfg.adamw_fused == "auto":
        return supported
    if cfg.adamw_fused and not supported:
        raise UserError(f"adamw_fused=true: PyTorch has no fused AdamW for {device_type!r} devices; "
                        "set adamw_fused to auto or false")
    return bool(cfg.adamw_fused)


def _check_dtype(groups: list[dict[str, Any]], dtype: torch.dtype, name: str) -> None:
    wrong = sorted({str(p.dtype) for group in groups for p in group["params"] if p.dtype != dtype})
    if wrong:
        raise UserError(f"optimizer={name!r} trains {dtype} weights, but trainable weights are {', '.join(wrong)}: "
                        f"cast them first (the trainer does this by `trained_weight_dtype`)")


def set_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Switch optimisers that keep two sets of weights (schedule-free) between training and evaluation.

    Call with training=False before validation, sampling or exporting weights, and with True
    before the next step. A no-op for every other optimiser.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimisers
    switch = getattr(inner, "train" if training else "eval", None)
    if callable(switch):
        switch()
