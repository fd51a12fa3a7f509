"""Learning-rate schedules: a warm-up, then the named shape.

Every schedule is a pure function of the step (a multiplier of the peak learning rate),
wrapped in a `LambdaLR`. diffusers provides all but `sine`, which follows SimpleTuner's
wave: the rate swings between the peak and half the peak, `(1 + |cos(pi * x)|) / 2`.
Unlike SimpleTuner (whose period is lr_warmup_steps and which has no warm-up), it starts
at its crest after the warm-up and makes lr_num_cycles swings over the remaining steps.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

logger = get_logger(__name__)

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "sine")


def sine_factor(step: int, *, warmup_steps: int, total_steps: int, num_cycles: float) -> float:
    """Multiplier of the peak rate at `step` for the sine schedule (pure)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1.0 + abs(math.cos(math.pi * num_cycles * min(progress, 1.0)))) / 2.0


def _constant(step: int) -> float:
    return 1.0


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int, steps_per_update: int = 1
) -> LambdaLR:
    """The schedule of `cfg.lr_scheduler` over `total_steps` optimiser updates.

    `steps_per_update` is how many times the scheduler's `step()` is called per update: pass
    `accelerator.num_processes` when the scheduler goes through `accelerator.prepare` (accelerate
    then steps it once per process), 1 otherwise.
    """
    name = cfg.lr_scheduler
    if name not in SCHEDULES:
        raise ConfigError(f"lr_scheduler={name!r} is unknown; accepted: {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one training step, got total_steps={total_steps}")
    if cfg.optimizer == "adamw_schedulefree":
        # Schedule-free AdamW warms up by itself and must not be decayed from outside.
        if name not in ("constant", "constant_with_warmup"):
            logger.warning("lr_scheduler=%s is ignored with optimizer=adamw_schedulefree (constant rate)", name)
        return LambdaLR(optimizer, _constant)
    warmup = cfg.lr_warmup_steps * steps_per_update
    total = total_steps * steps_per_update
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # every schedule honours lr_warmup_steps
    if name == "sine":
        factor = partial(sine_factor, warmup_steps=warmup, total_steps=total, num_cycles=cfg.lr_num_cycles)
        return LambdaLR(optimizer, factor)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
