"""Our training step, as the benchmark measures it: SimpleTuner's own pieces plus the speed levers.

This is the one place where the benchmark meets SimpleTuner. What comes from the package:
  * the model family (`simpletuner.models.registry.get_family`): its `predict`, its adapter targets,
    its `objective` (`simpletuner.train.objectives.Objective`) and `training_loss`;
  * the dtype policy (`simpletuner.models.base.DTypePolicy.for_training`);
  * the optimiser (`simpletuner.train.optim.build_optimizer`: fused AdamW on CUDA).
What is still benchmark-local, until the package has it (see `_attach_lora`, `_placeholder_loss`):
  * LoRA injection falls back to peft `add_adapter` here while `simpletuner.train.adapters` is absent;
  * the loss of families not registered yet (sd3, flux, pixart_sigma): sync-free flow matching /
    epsilon written here, with the same arithmetic, until their `models/<family>.py` exists and
    `family_batch` maps the cached batch to their `predict` inputs.

Levers (each switchable, so before/after can be recorded):
  bf16_base      LoRA: frozen base in bf16 and trainable parameters in fp32 (off: all fp32 under autocast)
  channels_last  UNets: weights and latents in channels_last memory format
  flash          SDPA prefers the flash kernel (then memory-efficient, then math where flash cannot run)
  compile        torch.compile of the repeated blocks (diffusers' compile_repeated_blocks, plus per-block
                 compile of the other repeated classes, e.g. ResnetBlock2D)
  fused_adamw    fused AdamW (off: the foreach implementation)
  no_sync        nothing in the step waits for the GPU: the loss stays on the device and the objective's
                 tables are moved there once (off: .item() per step, tables copied from the host per step)
  prefetch       the next batch is copied from pinned memory on a side stream while this step computes
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from benchmarks.architectures import Architecture, build_model
from benchmarks.steps import (
    MAX_GRAD_NORM, BlockingFeed, add_lora, PrefetchFeed, PreparedStep, Workload, cpu_batches, trainable,
)

LEVERS = ("bf16_base", "channels_last", "flash", "compile", "fused_adamw", "no_sync", "prefetch")
DEFAULT_LEVERS = LEVERS  # until H100 before/after rows say otherwise, every lever is on

# benchmark architecture -> SimpleTuner model_family
FAMILY_OF = {"sd15": "sd1x", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart_sigma"}


def parse_levers(spec: str) -> tuple[str, ...]:
    """'all', 'none', 'a,b', or 'all,-compile' -> the enabled levers, in LEVERS order."""
    from simpletuner.errors import UserError

    enabled: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name = item.lstrip("-+")
        if item in ("all", "default"):
            enabled |= set(DEFAULT_LEVERS if item == "default" else LEVERS)
        elif item == "none":
            enabled.clear()
        elif name in LEVERS:
            (enabled.discard if item.startswith("-") else enabled.add)(name)
        else:
            raise UserError(f"--levers {spec!r}: unknown lever {name!r}; accepted: all, none, default, "
                            f"{', '.join(LEVERS)} (prefix '-' to remove one)")
    return tuple(lever for lever in LEVERS if lever in enabled)


def training_config(work: Workload, levers: tuple[str, ...]) -> Any:
    """The SimpleTuner configuration this step stands for."""
    from simpletuner.config.schema import TrainingConfig

    return TrainingConfig(
        model_family=FAMILY_OF[work.arch.name],
        model_type=work.mode,
        pretrained_model_name_or_path="benchmark/random-weights",
        output_dir="benchmark-output",
        lora_rank=work.lora_rank,
        base_model_default_dtype="bf16" if "bf16_base" in levers else "fp32",
        gradient_checkpointing=work.gradient_checkpointing,
        mixed_precision="bf16",
    )


def registered_family(arch: Architecture) -> Any | None:
    """SimpleTuner's family for this architecture, or None while it is not in the registry yet."""
    from simpletuner.models.registry import FAMILIES, get_family

    name = FAMILY_OF[arch.name]
    return get_family(name) if name in FAMILIES and name in FAMILY_BATCH else None


# --- cached batch -> the family's batch (what SimpleTuner's collate hands `training_loss`) -----------


def _sd_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"latents": batch["latents"], "text": {"prompt_embeds": batch["encoder_hidden_states"]}}


def _sdxl_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    ids = batch["time_ids"]
    return {
        "latents": batch["latents"],
        "text": {"prompt_embeds": batch["encoder_hidden_states"], "pooled_prompt_embeds": batch["pooled"]},
        "original_size": ids[:, 0:2], "crop_top_left": ids[:, 2:4], "target_size": ids[:, 4:6],
    }


# Add sd3 / flux / pixart here when their families land: nothing else changes.
FAMILY_BATCH: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, Any]]] = {"sd1x": _sd_batch, "sdxl": _sdxl_batch}


# --- the model ------------------------------------------------------------------------------------------


def _make_trainable(model: torch.nn.Module, cfg: Any, targets: list[str]) -> None:
    """SimpleTuner's adapters module when present (full, or peft LoRA on the family's targets);
    until it lands, the same peft LoRA injected here. Trainable parameters end in fp32 either way:
    with a bf16 base, peft creates the adapters in bf16 and AdamW on bf16 weights loses updates."""
    try:
        from simpletuner.train.adapters import prepare_trainable
    except ImportError:
        prepare_trainable = None
    if prepare_trainable is not None:
        prepare_trainable(model, cfg, targets)
    elif cfg.model_type == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        add_lora(model, targets, cfg.lora_rank)
    for param in trainable(model):
        param.data = param.data.float()


def _compile_blocks(model: torch.nn.Module, arch: Architecture) -> None:
    import torch._dynamo

    # one compiled code object serves every block of a class; UNet blocks come in many shapes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    regional = set(getattr(model, "_repeated_blocks", None) or ())
    if regional and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks()
    for module in model.modules():
        if type(module).__name__ in arch.block_classes and type(module).__name__ not in regional:
            module.compile()


def _build_model(work: Workload, levers: tuple[str, ...], family: Any, cfg: Any) -> torch.nn.Module:
    from simpletuner.models.base import DTypePolicy

    arch = work.arch
    model = build_model(arch, tiny=work.tiny, device=work.device, dtype=DTypePolicy.for_training(cfg).denoiser)
    targets = family.adapter_targets(cfg) if family is not None else list(arch.lora_targets)
    _make_trainable(model, cfg, targets)
    if work.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if arch.is_unet and "channels_last" in levers:
        model.to(memory_format=torch.channels_last)
    model.train()
    if "compile" in levers:
        _compile_blocks(model, arch)
    return model


def _optimizer(params: list[torch.nn.Parameter], cfg: Any, work: Workload, levers: tuple[str, ...]):
    from simpletuner.train.optim import build_optimizer, parameter_groups

    if "fused_adamw" in levers:
        if work.device.type == "cuda":
            return build_optimizer(params, cfg, work.device.type)
        return torch.optim.AdamW(parameter_groups(params, cfg.adam_weight_decay), lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True)
    return torch.optim.AdamW(parameter_groups(params, cfg.adam_weight_decay), lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, foreach=True)


# --- the loss -------------------------------------------------------------------------------------------


def _family_loss(family: Any, model: torch.nn.Module, cfg: Any, device: torch.device, sync_free: bool):
    """SimpleTuner's `training_loss` over the family's `predict` and `objective`.

    sync_free: the objective's schedule tables live on the device; otherwise every step copies them
    from pageable host memory, and such a copy waits for the GPU's queue to drain.
    """
    import dataclasses

    from diffusers import DDPMScheduler

    from simpletuner.models.base import Components
    from simpletuner.train.objectives import training_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    modules = {family.denoiser_name(): model, "scheduler": scheduler}
    index = {"_class_name": family.pipeline_classes[0]}
    components = Components(modules=modules, noise_scheduler=scheduler, source="benchmark",
                            pipeline_class=index["_class_name"], settings=family.settings_from(cfg, index, modules))
    objective = family.objective(cfg, components)
    if sync_free:
        objective = dataclasses.replace(objective, alphas_cumprod=objective.alphas_cumprod.to(device),
                                        timestep_weights=objective.timestep_weights.to(device))
    to_family_batch = FAMILY_BATCH[family.name]

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        family_batch = to_family_batch(batch)
        draw = objective.draw(family_batch["latents"])
        return training_loss(family, components, objective, family_batch, draw)

    return loss


def _placeholder_loss(model: torch.nn.Module, arch: Architecture, device: torch.device):
    """Sync-free loss for families SimpleTuner does not register yet (same arithmetic as theirs will be)."""
    from simpletuner.train.objectives import add_noise, alphas_cumprod_from_betas

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = alphas_cumprod_from_betas(betas).to(device)
    shift = 3.0

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        if arch.objective == "flow":
            u = torch.rand(bsz, device=latents.device)
            sigma = shift * u / (1 + (shift - 1) * u)
            s = sigma.view(-1, 1, 1, 1).to(latents.dtype)
            noisy, timesteps, target = (1 - s) * latents + s * noise, sigma * 1000, noise - latents
        else:
            timesteps = torch.randint(0, 1000, (bsz,), device=latents.device)
            noisy, target = add_noise(alphas_cumprod, latents, noise, timesteps), noise
        pred = arch.call(model, noisy, timesteps, batch)
        return ((pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()

    return loss


# --- the step -------------------------------------------------------------------------------------------


def _attention_context(levers: tuple[str, ...]):
    if "flash" not in levers:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities, but flash already comes first where it can run
        return lambda: sdpa_kernel(order)
    return lambda: sdpa_kernel(order, set_priority=True)


def build_our_step(work: Workload, levers: tuple[str, ...]) -> PreparedStep:
    """SimpleTuner's training step for `work`, with the given levers on."""
    arch, device = work.arch, work.device
    cfg = training_config(work, levers)
    family = registered_family(arch)
    model = _build_model(work, levers, family, cfg)
    params = trainable(model)
    optimizer = _optimizer(params, cfg, work, levers)
    if family is not None:
        compute_loss = _family_loss(family, model, cfg, device, "no_sync" in levers)
    else:
        compute_loss = _placeholder_loss(model, arch, device)
    pool = cpu_batches(work, pin="prefetch" in levers and device.type == "cuda")
    feed = (PrefetchFeed if "prefetch" in levers else BlockingFeed)(pool, device)
    attention = _attention_context(levers)
    channels_last = arch.is_unet and "channels_last" in levers
    sync_free = "no_sync" in levers
    state: dict[str, Any] = {}

    def run_step() -> None:
        batch = feed.next()
        if channels_last:
            batch["latents"] = batch["latents"].contiguous(memory_format=torch.channels_last)
        with attention(), torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["last"] = loss.detach() if sync_free else loss.item()

    return PreparedStep(
        "simpletuner", model, run_step, lambda: float(state["last"]), sum(p.numel() for p in params)
    )
