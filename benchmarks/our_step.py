"""Our training step, as the benchmark measures it: SimpleTuner's own pieces plus the speed levers.

This is the one place where the benchmark meets SimpleTuner. What comes from the package:
  * the model family (`simpletuner.models.registry.get_family`): its `settings_from`, `objective`,
    `draw_conditioning` and `predict`, with `simpletuner.models.objectives.training_loss`;
  * the dtype policy (`simpletuner.models.base.DTypePolicy.for_training`);
  * what trains (`simpletuner.train.adapters.prepare_trainable`: full, or peft LoRA);
  * the optimiser (`simpletuner.train.optim.build_optimizer`: fused AdamW on CUDA).
What is benchmark-local: the family's `Components` are built around the bare denoiser with the
release's scheduler (`family.load` would read a checkpoint; text and latents come from the cache),
and `FAMILY_INPUTS` maps the cached batch to what SimpleTuner's collate hands `training_loss`.
LoRA targets are the example scripts' (those of the reference), so the ratio compares the step, not the
adapter; SimpleTuner's own presets differ for SD3 (image attention only) and Flux.

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
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks.architectures import Architecture, build_model
from benchmarks.steps import (
    MAX_GRAD_NORM, BlockingFeed, PrefetchFeed, PreparedStep, Workload, cpu_batches, trainable,
)

LEVERS = ("bf16_base", "channels_last", "flash", "compile", "fused_adamw", "no_sync", "prefetch")
DEFAULT_LEVERS = LEVERS  # until H100 before/after rows say otherwise, every lever is on

# benchmark architecture -> SimpleTuner model_family
FAMILY_OF = {"sd15": "sd1x", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart_sigma",
             "hunyuan_dit": "hunyuan_dit"}


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
    """SimpleTuner's family for this architecture, or None where the benchmark has no wiring for it."""
    from simpletuner.models.registry import FAMILIES, get_family

    name = FAMILY_OF[arch.name]
    return get_family(name) if name in FAMILIES and name in FAMILY_INPUTS else None


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


def _sd3_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    text = {"prompt_embeds": batch["encoder_hidden_states"], "pooled_prompt_embeds": batch["pooled"]}
    return {"latents": batch["latents"], "text": text}


def _flux_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The text cache also keeps T5's mask (all ones here: no padding); ids and guidance are the family's."""
    embeds = batch["encoder_hidden_states"]
    mask = torch.ones(embeds.shape[:2], device=embeds.device, dtype=torch.long)
    text = {"prompt_embeds": embeds, "pooled_prompt_embeds": batch["pooled"], "attention_mask": mask}
    return {"latents": batch["latents"], "text": text}


def _pixart_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    text = {"prompt_embeds": batch["encoder_hidden_states"], "prompt_attention_mask": batch["encoder_attention_mask"]}
    return {"latents": batch["latents"], "text": text}


def _hunyuan_dit_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    text = {"prompt_embeds": batch["encoder_hidden_states"], "prompt_attention_mask": batch["encoder_attention_mask"],
            "prompt_embeds_2": batch["encoder_hidden_states_t5"],
            "prompt_attention_mask_2": batch["encoder_attention_mask_t5"]}
    meta = batch["image_meta_size"]
    return {"latents": batch["latents"], "text": text, "original_size": meta[:, 0:2], "target_size": meta[:, 2:4],
            "crop_top_left": meta[:, 4:6]}


# --- what `family.load` would have read: the release's scheduler, the tokenizers' lengths ---------------


@dataclass(frozen=True)
class TokenizerLength:
    """All `settings_from` reads of a tokenizer; the benchmark has none (text comes from the cache)."""

    model_max_length: int


def _sd_modules() -> dict[str, Any]:  # SD 1.5 and SDXL scheduler_config.json
    from diffusers import DDPMScheduler

    return {"scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear")}


def _sd3_modules() -> dict[str, Any]:  # stable-diffusion-3-medium-diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {"scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "tokenizer": TokenizerLength(77)}


def _flux_modules() -> dict[str, Any]:  # FLUX.1-dev
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {"scheduler": FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)}


def _pixart_modules() -> dict[str, Any]:  # PixArt-Sigma-XL-2-1024-MS
    from diffusers import DPMSolverMultistepScheduler

    return {"scheduler": DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                                     beta_schedule="linear", prediction_type="epsilon"),
            "tokenizer": None}  # T5's length: the family's default (300)


def _hunyuan_dit_modules() -> dict[str, Any]:  # HunyuanDiT-v1.2-Diffusers
    from diffusers import DDPMScheduler

    return {"scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.018,
                                       beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
                                       timestep_spacing="leading", clip_sample=False)}


@dataclass(frozen=True)
class FamilyInputs:
    """How the benchmark stands in for a family's loaded checkpoint and collated batch."""

    batch: Callable[[dict[str, torch.Tensor]], dict[str, Any]]  # cached batch -> family batch
    modules: Callable[[], dict[str, Any]]  # the Components' modules besides the denoiser


FAMILY_INPUTS: dict[str, FamilyInputs] = {
    "sd1x": FamilyInputs(_sd_batch, _sd_modules),
    "sdxl": FamilyInputs(_sdxl_batch, _sd_modules),
    "sd3": FamilyInputs(_sd3_batch, _sd3_modules),
    "flux": FamilyInputs(_flux_batch, _flux_modules),
    "pixart_sigma": FamilyInputs(_pixart_batch, _pixart_modules),
    "hunyuan_dit": FamilyInputs(_hunyuan_dit_batch, _hunyuan_dit_modules),
}


def family_components(family: Any, model: torch.nn.Module, cfg: Any) -> Any:
    """The `Components` `family.load(cfg)` would give, around the benchmark's bare denoiser."""
    from simpletuner.models.base import Components

    modules = {**FAMILY_INPUTS[family.name].modules(), family.denoiser_name(): model}
    pipeline_class = family.pipeline_classes[0]
    settings = family.settings_from(cfg, {"_class_name": pipeline_class}, modules)
    noise_scheduler = family._noise_scheduler(modules["scheduler"], cfg.training_scheduler_timestep_spacing)
    return Components(modules=modules, noise_scheduler=noise_scheduler, source="benchmark",
                      pipeline_class=pipeline_class, settings=settings)


# --- the model ------------------------------------------------------------------------------------------


def _make_trainable(model: torch.nn.Module, cfg: Any, targets: list[str]) -> None:
    """SimpleTuner's `prepare_trainable` (full, or peft LoRA on `targets`). Trainable parameters end in
    fp32: with a bf16 base, peft creates the adapters in bf16 and AdamW on bf16 weights loses updates."""
    from simpletuner.train.adapters import prepare_trainable

    prepare_trainable(model, cfg, targets)
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


def _build_model(work: Workload, levers: tuple[str, ...], cfg: Any) -> torch.nn.Module:
    from simpletuner.models.base import DTypePolicy

    arch = work.arch
    model = build_model(arch, tiny=work.tiny, device=work.device, dtype=DTypePolicy.for_training(cfg).denoiser)
    _make_trainable(model, cfg, list(arch.lora_targets))
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
    """SimpleTuner's `training_loss` over the family's `predict` and `objective`, as the trainer's step.

    sync_free: the objective's schedule tables live on the device; otherwise every step copies them
    from pageable host memory, and such a copy waits for the GPU's queue to drain.
    """
    from simpletuner.models.objectives import training_loss

    components = family_components(family, model, cfg)
    objective = family.objective(cfg, components)
    if sync_free:
        objective = objective.to(device)
    to_family_batch = FAMILY_INPUTS[family.name].batch

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        family_batch = family.draw_conditioning(components, to_family_batch(batch))
        draw = objective.draw(family_batch["latents"])
        return training_loss(family, components, objective, family_batch, draw)

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
    if family is None:
        from simpletuner.errors import UserError

        raise UserError(f"--model {arch.name}: no SimpleTuner family is wired for it in benchmarks/our_step.py "
                        f"(FAMILY_INPUTS has {', '.join(FAMILY_INPUTS)})")
    model = _build_model(work, levers, cfg)
    params = trainable(model)
    optimizer = _optimizer(params, cfg, work, levers)
    compute_loss = _family_loss(family, model, cfg, device, "no_sync" in levers)
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
