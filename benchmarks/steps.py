"""What both measured steps share (workload, cached batches, the prepared-step record) and the reference
step: a plain diffusers training step written the way diffusers' example scripts train.

Reference, as in train_text_to_image_lora.py / train_text_to_image.py (UNets) and
train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py (flow models), with
`accelerate --mixed_precision bf16` and no `--gradient_checkpointing` unless asked:
  * LoRA: the denoiser in bf16 (`weight_dtype`), frozen; `add_adapter(LoraConfig(r, lora_alpha=r,
    init_lora_weights="gaussian", target_modules=<the script's default>))`; the adapters stay in bf16
    (the scripts upcast them to fp32 only for fp16).  Full: the denoiser in fp32, all trainable.
  * forward under bf16 autocast (what `Accelerator(mixed_precision="bf16").prepare(model)` wraps it in),
    SDPA attention (diffusers' default processor), `torch.optim.AdamW(lr=1e-4, weight_decay=1e-2)`
    (not fused), a constant LR scheduler, `clip_grad_norm_(params, 1.0)`, `zero_grad()`.
  * every step reads the loss back to the host (`train_loss += avg_loss.item()`), and the flow
    scripts look up each timestep's sigma with `.nonzero().item()` (their `get_sigmas`).
  * batches come from CPU memory, moved with a blocking `.to(device)` (accelerate's device placement
    of a DataLoader without pinned memory).
Text encoders and VAE are left out of both steps: inputs come from the cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.architectures import Architecture, build_model, make_batch

LORA_RANK = 16
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
BATCH_POOL = 2  # distinct cached batches cycled through, so no step reuses the previous step's tensors


@dataclass(frozen=True)
class Workload:
    """What is trained: the same for our step and the reference."""

    arch: Architecture
    mode: str  # "lora" or "full"
    batch: int
    resolution: int
    tiny: bool
    device: torch.device
    gradient_checkpointing: bool = False
    lora_rank: int = LORA_RANK
    seed: int = 0


@dataclass
class PreparedStep:
    """A built model + optimiser, and a closure running one optimiser step (batch transfer included)."""

    name: str
    model: torch.nn.Module
    run_step: Callable[[], None]
    last_loss: Callable[[], float]  # reads the latest loss back (a host sync)
    trainable_parameters: int
    close: Callable[[], None] = lambda: None  # stops what the step runs beside it (the trainer's batch thread)
    levers: list[str] | None = None  # the speed levers it runs with, where it has options


def cpu_batches(work: Workload, *, pin: bool) -> list[dict[str, torch.Tensor]]:
    """The cached batches as a loader yields them: bf16 floats in CPU memory (pinned if asked)."""
    generator = torch.Generator().manual_seed(work.seed)
    pool = []
    for _ in range(BATCH_POOL):
        batch = make_batch(work.arch, batch=work.batch, resolution=work.resolution, tiny=work.tiny, generator=generator)
        batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        pool.append(batch)
    return pool


class BlockingFeed:
    """Moves each batch to the device when it is needed, from pageable memory."""

    def __init__(self, pool: list[dict[str, torch.Tensor]], device: torch.device):
        self._batches = itertools.cycle(pool)
        self._device = device

    def next(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self._device) for k, v in next(self._batches).items()}


def add_lora(model: torch.nn.Module, targets: list[str], rank: int) -> None:
    """peft LoRA as the example scripts add it (`add_adapter`; PixArt's model lacks it: inject directly)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- the reference: diffusers' example-script step ---------------------------------------------------


class ReferenceNoise:
    """Noise, timesteps and target as the example scripts draw them."""

    def __init__(self, arch: Architecture, device: torch.device):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.flow = arch.objective == "flow"
        self.device = device
        if self.flow:
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        else:
            self.scheduler = DDPMScheduler(
                num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
            )

    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        if not self.flow:
            timesteps = torch.randint(0, 1000, (bsz,), device=latents.device).long()
            return self.scheduler.add_noise(latents, noise, timesteps), timesteps, noise
        # compute_density_for_timestep_sampling("none") + get_sigmas() of the SD3/Flux scripts
        u = torch.rand(bsz)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(device=latents.device)
        schedule = self.scheduler.timesteps.to(latents.device)
        sigmas = self.scheduler.sigmas.to(device=latents.device, dtype=latents.dtype)
        step_indices = [(schedule == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten().view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        return noisy, timesteps, noise - latents


def reference_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bsz = pred.shape[0]
    return ((pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()


def build_reference_step(work: Workload) -> PreparedStep:
    """diffusers' example-script training step for `work` (see module docstring)."""
    from diffusers.optimization import get_scheduler

    arch, device = work.arch, work.device
    model = build_model(arch, tiny=work.tiny, device=device, dtype=torch.bfloat16 if work.mode == "lora" else torch.float32)
    if work.mode == "lora":
        model.requires_grad_(False)
        add_lora(model, list(arch.lora_targets), work.lora_rank)
    if work.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    feed = BlockingFeed(cpu_batches(work, pin=False), device)
    noise = ReferenceNoise(arch, device)
    state = {"train_loss": 0.0}

    def run_step() -> None:
        batch = feed.next()
        noisy, timesteps, target = noise(batch["latents"])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = arch.call(model, noisy, timesteps, batch)
        loss = reference_loss(pred, target)
        state["train_loss"] += loss.detach().repeat(work.batch).mean().item()
        state["last"] = loss.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    return PreparedStep(
        "diffusers example", model, run_step, lambda: float(state["last"].item()), sum(p.numel() for p in params)
    )
