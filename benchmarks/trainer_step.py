"""The trainer's own training step, as `simpletuner train` runs it, on the benchmark's denoiser.

The step is `simpletuner.train.trainer._update`, the function the training loop calls once per optimiser
update, over a `Run` assembled from the trainer's own pieces:
  * the configuration: a `TrainingConfig` (`training_config`), so every lever is an option of
    `simpletuner train` (torch_compile, channels_last, attention_backend, fuse_qkv_projections, adamw_fused,
    dataloader_prefetch, ...) with the trainer's defaults; `--set key=value` changes one;
  * the model: `simpletuner.train.setup.prepare_model` (what trains, fusion, checkpointing, the levers);
  * the optimiser and schedule: `train.optim.build_optimizer`, `train.schedules.build_lr_scheduler`, wrapped
    by the run's sharding (`train.sharding.sharding_for`; at several processes, the overlapped reducer);
  * the batches: the trainer's `BatchFeed` (`trainer._feed`), built ahead in a thread when
    dataloader_prefetch is on, from cached-batch stand-ins (`BenchData`: random latents and text outputs
    shaped as the caches give them, in CPU memory);
  * the loss: the family's `predict` and `objective` in `models.objectives.training_loss`, through the
    trainer's `_loss` (caption dropout, latents drawn from the cached distribution, conditioning).
What is benchmark-local: the family's `Components` are built around the bare denoiser with the
release's scheduler (`family.load` would read a checkpoint; text and latents come from the cache),
and `FAMILY_INPUTS` maps the cached batch to the family's batch. LoRA targets are the example scripts' (those of
the reference; `with_reference_targets`), so the ratio compares the step, not the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks.architectures import Architecture, build_model
from benchmarks.steps import MAX_GRAD_NORM, PreparedStep, Workload, cpu_batches

# benchmark architecture -> SimpleTuner model_family
FAMILY_OF = {"sd15": "sd1x", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart_sigma",
             "hunyuan_dit": "hunyuan_dit"}


def training_config(work: Workload, options: Mapping[str, Any] | None = None) -> Any:
    """The `simpletuner train` configuration this step stands for: the workload's model, mode, rank and
    checkpointing, optimizer adamw (the reference's), bf16 mixed precision, then `options` (any option of
    `simpletuner train`, e.g. torch_compile=false) over it; the levers are the options' defaults unless set."""
    from simpletuner.config.schema import TrainingConfig

    settings: dict[str, Any] = dict(
        model_family=FAMILY_OF[work.arch.name], model_type=work.mode,
        pretrained_model_name_or_path="benchmark/random-weights", output_dir="benchmark-output",
        lora_rank=work.lora_rank, gradient_checkpointing=work.gradient_checkpointing, mixed_precision="bf16",
        optimizer="adamw", learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=0,
        caption_dropout_probability=0.0, max_grad_norm=MAX_GRAD_NORM)
    return TrainingConfig(**{**settings, **dict(options or {})})


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


def _vae(scaling_factor: float, shift_factor: float | None = None) -> Any:
    """What the family reads of the release's VAE (its config: latent scaling, downsampling); the latents come
    from the cache, so no VAE runs."""
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor,
                                                  block_out_channels=(128, 256, 512, 512)))


def _sd_modules() -> dict[str, Any]:  # SD 1.5 and SDXL scheduler_config.json
    from diffusers import DDPMScheduler

    return {"scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear"), "vae": _vae(0.18215)}


def _sdxl_modules() -> dict[str, Any]:
    return {**_sd_modules(), "vae": _vae(0.13025)}


def _sd3_modules() -> dict[str, Any]:  # stable-diffusion-3-medium-diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {"scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "tokenizer": TokenizerLength(77), "vae": _vae(1.5305, 0.0609)}


def _flux_modules() -> dict[str, Any]:  # FLUX.1-dev
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {"scheduler": FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15), "vae": _vae(0.3611, 0.1159)}


def _pixart_modules() -> dict[str, Any]:  # PixArt-Sigma-XL-2-1024-MS
    from diffusers import DPMSolverMultistepScheduler

    return {"scheduler": DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                                     beta_schedule="linear", prediction_type="epsilon"),
            "tokenizer": None, "vae": _vae(0.13025)}  # tokenizer: T5's length is the family's default (300)


def _hunyuan_dit_modules() -> dict[str, Any]:  # HunyuanDiT-v1.2-Diffusers
    from diffusers import DDPMScheduler

    return {"scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.018,
                                       beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
                                       timestep_spacing="leading", clip_sample=False), "vae": _vae(0.13025)}


@dataclass(frozen=True)
class FamilyInputs:
    """How the benchmark stands in for a family's loaded checkpoint and collated batch."""

    batch: Callable[[dict[str, torch.Tensor]], dict[str, Any]]  # cached batch -> family batch
    modules: Callable[[], dict[str, Any]]  # the Components' modules besides the denoiser


FAMILY_INPUTS: dict[str, FamilyInputs] = {
    "sd1x": FamilyInputs(_sd_batch, _sd_modules),
    "sdxl": FamilyInputs(_sdxl_batch, _sdxl_modules),
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


# --- the trainer's step ----------------------------------------------------------------------------------


class BenchSampler:
    """Stands in for the run's sampler: an endless stream of batch numbers, with a state to checkpoint."""

    epoch = 1

    def __init__(self) -> None:
        self.drawn = 0

    def __next__(self) -> int:
        self.drawn += 1
        return self.drawn - 1

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}


class BenchData:
    """Stands in for `TrainingData.batch`: the cached batches (CPU memory), cycled, in the trainer's layout."""

    def __init__(self, family: Any, pool: list[dict[str, torch.Tensor]]) -> None:
        to_family_batch = FAMILY_INPUTS[family.name].batch
        self.pool = [trainer_batch(to_family_batch(batch)) for batch in pool]

    def batch(self, refs: int, family: Any, components: Any, rng: Any, refill: Any = None) -> dict[str, Any]:
        return self.pool[refs % len(self.pool)]


def trainer_batch(family_batch: dict[str, Any]) -> dict[str, Any]:
    """A family batch as `TrainingData.batch` stacks it: the latents' cached distribution (mean, a small std),
    the text outputs, the conditioning; no captions (the text encoders do not train)."""
    batch = dict(family_batch)
    latents = batch.pop("latents")
    return {"latent_mean": latents, "latent_std": torch.full_like(latents, 1e-3), **batch}


def build_trainer_step(work: Workload, options: Mapping[str, Any] | None = None) -> PreparedStep:
    """`simpletuner train`'s step for `work`, with `options` over the benchmark's configuration."""
    from accelerate import Accelerator

    from simpletuner.errors import UserError

    cfg = training_config(work, options)
    family = registered_family(work.arch)
    if family is None:
        raise UserError(f"--model {work.arch.name}: no SimpleTuner family is wired for it in benchmarks/trainer_step.py")
    family = with_reference_targets(family, work.arch)
    release_accelerator()  # a run earlier in this process (the test suite's) may have set another precision
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=work.device.type == "cpu")
    try:
        return _assemble(work, cfg, family, accelerator)
    except BaseException:
        release_accelerator()
        raise


def _assemble(work: Workload, cfg: Any, family: Any, accelerator: Any) -> PreparedStep:
    from simpletuner.config.load import Settings
    from simpletuner.models.base import DTypePolicy
    from simpletuner.train import trainer
    from simpletuner.train.checkpoint import Processes
    from simpletuner.train.nonfinite import NonFiniteGuard
    from simpletuner.train.optim import build_optimizer
    from simpletuner.train.schedules import build_lr_scheduler
    from simpletuner.train.setup import Run, prepare_model
    from simpletuner.train.sharding import sharding_for

    model = build_model(work.arch, tiny=work.tiny, device=work.device, dtype=DTypePolicy.for_training(cfg).denoiser)
    components = family_components(family, model, cfg)
    trained, levers = prepare_model(cfg, family, components, accelerator.device)
    sharding = sharding_for(accelerator, cfg)
    optimizer = sharding.prepare(accelerator, trained.module,
                                 build_optimizer(trained.parameters(), cfg, accelerator.device.type))
    total = 1_000_000  # the feed builds ahead within this many steps; the benchmark stops long before
    run = Run(Settings(training=cfg, datasets=[]), accelerator, Processes.from_accelerator(accelerator), family,
              components, BenchData(family, cpu_batches(work, pin=False)), trained, optimizer,
              build_lr_scheduler(optimizer, cfg, total), BenchSampler(), family.objective(cfg, components).to(
                  accelerator.device), None, None, None, {}, total, None, sharding=sharding, levers=levers)
    run.feed = trainer._feed(run, 0)
    first = run.data.pool[0]["text"]
    empty_text = {key: value[:1].to(accelerator.device) for key, value in first.items()}
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator.device)
    state: dict[str, Any] = {"step": 0}

    def run_step() -> None:
        state["last"] = trainer._update(run, state["step"], empty_text, guard).loss
        state["step"] += 1

    def close() -> None:
        run.feed.close()
        release_accelerator()

    return PreparedStep("simpletuner", model, run_step, lambda: float(state["last"]),
                        sum(p.numel() for p in trained.parameters()), close=close,
                        levers=describe_levers(cfg, levers, accelerator.device.type))


def release_accelerator() -> None:
    """Forget accelerate's process-wide state (mixed precision, ...), so a later run in this process (the test
    suite's) may configure its own; the process group of a torchrun launch stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def with_reference_targets(family: Any, arch: Architecture) -> Any:
    """A copy of the family whose LoRA targets are the reference's (diffusers' example script's)."""
    import copy

    family = copy.copy(family)
    family.adapter_targets = lambda cfg: list(arch.lora_targets)
    return family


def describe_levers(cfg: Any, levers: Any, device_type: str) -> list[str]:
    """The speed levers this step runs with, as resolved for its device."""
    on = [("torch_compile", levers.compile), ("channels_last", levers.channels_last),
          (f"attention_backend={levers.attention or 'auto'}", True), ("fuse_qkv_projections", cfg.fuse_qkv_projections),
          ("dataloader_prefetch", cfg.dataloader_prefetch), ("gradient_checkpointing", cfg.gradient_checkpointing)]
    if cfg.optimizer == "adamw":
        from simpletuner.train.optim import adamw_fused

        on.append(("adamw_fused", adamw_fused(cfg, device_type)))
    return [name if value else f"-{name}" for name, value in on]
