"""The model-family interface: what the trainer, caches and validation call.

A family (SD 1.x/2.x, SDXL, ...) is one subclass of `ModelFamily`, found by name
through `simpletuner.models.registry.get_family`. The trainer never branches on a
family's name: everything particular to an architecture lives behind these methods.

Data that flows through the interface:
- `Components`: the loaded modules, by their diffusers pipeline names.
- text outputs: `dict[str, Tensor]` from `text_outputs`, exactly what the text cache
  stores, batched on dim 0.
- latents: `encode_images` returns the VAE's latent distribution (mean, std), unscaled,
  which the latent cache stores; `latents_from_distribution` draws and scales a sample.
- batch: a mapping with "latents", "text" and per-sample conditioning (see each family).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from simpletuner.errors import UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.data.records import ImagePlan
    from simpletuner.models.objectives import TrainingObjective

logger = get_logger(__name__)

# Which model_family a diffusers pipeline class belongs to, for "wrong family" messages.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd1x / sd2x / legacy",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl (refiner)",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart_sigma",
    "KolorsPipeline": "kolors",
    "IFPipeline": "deepfloyd",
    "IFSuperResolutionPipeline": "deepfloyd (stage II)",
    "HunyuanDiTPipeline": "hunyuan_dit",
}

# validation_noise_scheduler -> diffusers class (epsilon / v-prediction families)
VALIDATION_SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


@dataclass(frozen=True)
class DTypePolicy:
    """The dtype each kind of component is loaded in."""

    denoiser: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32
    text_encoders: torch.dtype = torch.float32

    @classmethod
    def for_training(cls, cfg: TrainingConfig) -> DTypePolicy:
        """Trained weights in fp32 (mixed precision autocasts them); frozen ones in the base dtype.

        A full fine-tune keeps fp32 master weights; under LoRA the frozen denoiser and the
        text encoders take base_model_default_dtype; the VAE takes vae_dtype (default: fp32).
        """
        from simpletuner.config.schema import trains_adapter

        frozen = _DTYPES[cfg.base_model_default_dtype]
        frozen_denoiser = trains_adapter(cfg) or getattr(cfg, "controlnet", False)  # a ControlNet run freezes it
        denoiser = frozen if frozen_denoiser else torch.float32
        vae = torch.float32 if cfg.vae_dtype == "default" else _DTYPES[cfg.vae_dtype]
        text = torch.float32 if cfg.train_text_encoder else frozen
        return cls(denoiser=denoiser, vae=vae, text_encoders=text)


@dataclass
class Components:
    """The loaded parts of a model, keyed by their diffusers pipeline names.

    `modules` holds e.g. "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
    "tokenizer_2", "scheduler" (the model's own inference scheduler); absent parts are None.
    `noise_scheduler` is the DDPM scheduler of training (the model's betas, no rescaling:
    the `Objective` applies zero-terminal-SNR itself). `settings` carries what the family
    read at load time: "prediction_type", "rescale_betas_zero_snr", "timestep_spacing",
    pipeline flags such as "force_zeros_for_empty_prompt", and family options.
    """

    modules: dict[str, Any]
    noise_scheduler: Any
    source: str
    pipeline_class: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.modules[name]

    def get(self, name: str) -> Any:
        return self.modules.get(name)

    def to(self, device: torch.device | str) -> Components:
        """Move every nn.Module to `device` (dtypes unchanged); returns self."""
        for module in self.modules.values():
            if isinstance(module, nn.Module):
                module.to(device)
        return self


@dataclass(frozen=True)
class ComponentSpec:
    """How to load one component: its pipeline name, loader class path, and whether it is needed."""

    name: str
    loader: str  # "package.module:Class"
    required: bool = True
    kind: str = "module"  # module | tokenizer | scheduler

    def load_class(self) -> Any:
        module, _, attr = self.loader.partition(":")
        return getattr(__import__(module, fromlist=[attr]), attr)


def size_conditioning(plan: ImagePlan) -> dict[str, Tensor]:
    """A sample's size conditioning from its ImagePlan ((width, height) there): original size, crop top-left
    and trained size as float (h, w) / (top, left) tensors, as SDXL-style pipelines compute them."""
    return {
        "original_size": torch.tensor([plan.original_size[1], plan.original_size[0]], dtype=torch.float32),
        "crop_top_left": torch.tensor(plan.crop_top_left, dtype=torch.float32),
        "target_size": torch.tensor([plan.target_size[1], plan.target_size[0]], dtype=torch.float32),
    }


def batch_size_conditioning(latents: Tensor, scale: int, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """[B, 2] original size, trained size and crop top-left of a batch on the latents' device; where the batch
    has none, the latents' own size in pixels (`scale` pixels per latent) and no crop."""
    device, count = latents.device, latents.shape[0]
    target = batch.get("target_size")
    if target is None:
        target = torch.tensor([latents.shape[-2] * scale, latents.shape[-1] * scale]).expand(count, 2)
    target = torch.as_tensor(target, device=device).float().reshape(-1, 2)
    original = batch.get("original_size")
    original = target if original is None else torch.as_tensor(original, device=device).float().reshape(-1, 2)
    crop = batch.get("crop_top_left")
    crop = torch.zeros_like(target) if crop is None else torch.as_tensor(crop, device=device).float().reshape(-1, 2)
    return original, target, crop


class ModelFamily(ABC):
    """One architecture: how to load it, encode text and images, predict, and build its pipeline."""

    name: ClassVar[str]
    # what the family declares
    alignment: ClassVar[int] = 64  # bucket sides are multiples of this (pixels)
    native_resolution: ClassVar[int] = 1024  # the side of the square it was trained at (pixels)
    default_prediction_type: ClassVar[str] = "epsilon"  # when the scheduler config names none
    latent_channels: ClassVar[int] = 4
    text_max_length: ClassVar[int] = 77
    # how it loads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # model_index.json _class_name values accepted
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = ()
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = {}
    lycoris_targets: ClassVar[tuple[str, ...]] = ("Attention", "FeedForward")  # module classes LyCORIS adapts
    # what a text encoder's LoRA adapts (train_text_encoder): CLIP's attention, as diffusers' examples adapt
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    t5_component: ClassVar[str | None] = None  # the T5 encoder that pretrained_t5_model_name_or_path replaces
    skip_layer_guidance: ClassVar[bool] = False  # its pipeline takes skip-layer guidance (validation_guidance_skip_*)
    modelspec_architecture: ClassVar[str] = ""  # the base model's modelspec.architecture id
    lora_loader: ClassVar[bool] = True  # its pipeline loads LoRAs with diffusers' load_lora_weights
    control_as_latents: ClassVar[bool] = False  # its ControlNet takes the control image as VAE latents
    block_lists: ClassVar[tuple[str, ...]] = ()  # the denoiser's lists of repeated blocks, in running order (block swap)
    controlnet_loader: ClassVar[str | None] = None  # "package:Class" of its ControlNet; None: it has none
    control_latents: ClassVar[bool] = False  # its ControlNet takes VAE latents of the control image (else pixels)

    # ------------------------------------------------------------ loading
    def load(self, cfg: TrainingConfig, dtypes: DTypePolicy | None = None) -> Components:
        """Load the components from a Hub id or local folder, with per-component dtypes.

        Local folders load with local_files_only; Hub ids honour HF_HUB_OFFLINE (cached files
        only). A missing component, or a model of another family, raises UserError.
        """
        dtypes = dtypes or DTypePolicy.for_training(cfg)
        source = cfg.pretrained_model_name_or_path
        index = read_model_index(source, cfg.revision)
        self.check_model_index(source, index)
        modules: dict[str, Any] = {}
        for spec in self.component_specs:
            modules[spec.name] = self._load_component(cfg, spec, index, dtypes)
        modules.update(self._override_components(cfg, dtypes))
        settings = self.settings_from(cfg, index, modules)
        noise_scheduler = self._noise_scheduler(modules["scheduler"], cfg.training_scheduler_timestep_spacing)
        return Components(modules=modules, noise_scheduler=noise_scheduler, source=source,
                          pipeline_class=index["_class_name"], settings=settings)

    def check_model_index(self, source: str, index: Mapping[str, Any]) -> None:
        """Raise UserError unless the model is of this family and has every required component."""
        class_name = index.get("_class_name")
        if class_name not in self.pipeline_classes:
            belongs = PIPELINE_FAMILIES.get(str(class_name), "an unknown family")
            raise UserError(
                f"{source}: model_index.json names a {class_name} ({belongs}), which model_family "
                f"{self.name!r} cannot train; it takes {', '.join(self.pipeline_classes)}. "
                "Set model_family to match the model, or point pretrained_model_name_or_path at a "
                f"{self.name} model."
            )
        present = [name for name, value in index.items() if not name.startswith("_") and declared(value)]
        missing = [spec.name for spec in self.component_specs if spec.required and spec.name not in present]
        if missing:
            raise UserError(
                f"{source}: the model lacks {', '.join(missing)}, which model_family {self.name!r} needs "
                f"(model_index.json declares {', '.join(sorted(present)) or 'no components'})."
            )
        if _is_local(source):
            absent = [spec.name for spec in self.component_specs
                      if spec.name in present and not (Path(source) / spec.name).is_dir()]
            if absent:
                raise UserError(f"{source}: model_index.json declares {', '.join(absent)} but the folder has no "
                                f"{', '.join(absent)} subfolder; the download looks incomplete.")

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        """What the family keeps from the configuration and model_index.json at load time."""
        scheduler_config = modules["scheduler"].config
        prediction = cfg.prediction_type or scheduler_config.get("prediction_type") or self.default_prediction_type
        return {
            "prediction_type": prediction,
            "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
            "timestep_spacing": cfg.inference_scheduler_timestep_spacing,
            "validation_scheduler": cfg.validation_noise_scheduler,
        }

    def _load_component(self, cfg: TrainingConfig, spec: ComponentSpec, index: Mapping[str, Any],
                        dtypes: DTypePolicy) -> Any:
        if not declared(index.get(spec.name)):
            return None
        source = cfg.pretrained_model_name_or_path
        kwargs: dict[str, Any] = {"subfolder": spec.name, "revision": cfg.revision,
                                  "local_files_only": _local_only(source)}
        if spec.kind == "module":
            kwargs["torch_dtype"] = self._dtype_of(spec.name, dtypes)
            if cfg.variant:
                kwargs["variant"] = cfg.variant
        if spec.kind == "scheduler":
            return _scheduler_class(index[spec.name]).from_pretrained(source, **kwargs)
        return _from_pretrained(spec.load_class(), source, spec.name, **kwargs)

    def _override_components(self, cfg: TrainingConfig, dtypes: DTypePolicy) -> dict[str, Any]:
        """Separately given components (a fixed VAE, a fine-tuned denoiser)."""
        overrides: dict[str, Any] = {}
        specs = {spec.name: spec for spec in self.component_specs}
        if cfg.pretrained_vae_model_name_or_path and "vae" in specs:
            path = cfg.pretrained_vae_model_name_or_path
            overrides["vae"] = _from_pretrained(specs["vae"].load_class(), path, "vae", torch_dtype=dtypes.vae,
                                                local_files_only=_local_only(path),
                                                subfolder=_subfolder_of(path, "vae"))
        if cfg.pretrained_unet_model_name_or_path and "unet" in specs:
            path = cfg.pretrained_unet_model_name_or_path
            subfolder = None if cfg.pretrained_unet_subfolder == "none" else cfg.pretrained_unet_subfolder
            overrides["unet"] = _from_pretrained(specs["unet"].load_class(), path, "unet",
                                                 torch_dtype=dtypes.denoiser, local_files_only=_local_only(path),
                                                 subfolder=subfolder)
        if cfg.pretrained_t5_model_name_or_path and self.t5_component in specs:
            path, name = cfg.pretrained_t5_model_name_or_path, self.t5_component
            overrides[name] = _from_pretrained(specs[name].load_class(), path, name, torch_dtype=dtypes.text_encoders,
                                               local_files_only=_local_only(path), subfolder=_t5_subfolder(path, name))
        if cfg.pretrained_transformer_model_name_or_path and "transformer" in specs:
            path = cfg.pretrained_transformer_model_name_or_path
            subfolder = None if cfg.pretrained_transformer_subfolder == "none" else cfg.pretrained_transformer_subfolder
            overrides["transformer"] = _from_pretrained(specs["transformer"].load_class(), path, "transformer",
                                                        torch_dtype=dtypes.denoiser,
                                                        local_files_only=_local_only(path), subfolder=subfolder)
        return overrides

    def _dtype_of(self, name: str, dtypes: DTypePolicy) -> torch.dtype:
        if name.startswith("text_encoder"):
            return dtypes.text_encoders
        if name == "vae":
            return dtypes.vae
        return dtypes.denoiser

    @staticmethod
    def _noise_scheduler(scheduler: Any, timestep_spacing: str) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=False,
                                         timestep_spacing=timestep_spacing)

    # ------------------------------------------------------------ declared facts
    def check_resolution(self, width: int, height: int) -> None:
        """Raise UserError if a training or validation size is not a multiple of the alignment."""
        if width <= 0 or height <= 0 or width % self.alignment or height % self.alignment:
            raise UserError(f"resolution {width}x{height} does not suit model_family {self.name!r}: both sides "
                            f"must be positive multiples of {self.alignment} pixels")

    def adapter_targets(self, cfg: TrainingConfig) -> list[str]:
        """Module names (peft target_modules) that LoRA adapts, from the family's presets."""
        preset = self.adapter_preset_name(cfg)
        if preset not in self.adapter_presets:
            raise UserError(f"LoRA target preset {preset!r} is not available for model_family {self.name!r}; "
                            f"choose one of {', '.join(self.adapter_presets)}")
        return list(self.adapter_presets[preset])

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return next(iter(self.adapter_presets))

    def default_resolution(self, cfg: TrainingConfig) -> int:
        """The native resolution for this run (pixels); a family whose variants differ answers per cfg."""
        return self.native_resolution

    # ------------------------------------------------------------ latents
    def vae_scale_factor(self, components: Components) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(components["vae"].config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, components: Components, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """VAE latent distribution (mean, std) of pixels in [-1, 1], [B, 3, H, W]; unscaled."""
        vae = components["vae"]
        distribution = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return distribution.mean, distribution.std

    def scale_latents(self, components: Components, latents: Tensor) -> Tensor:
        """VAE-space latents -> model-space latents: (x - shift) * scale."""
        config = components["vae"].config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def unscale_latents(self, components: Components, latents: Tensor) -> Tensor:
        """Model-space latents -> VAE-space latents, for decoding."""
        config = components["vae"].config
        shift = getattr(config, "shift_factor", None) or 0.0
        return latents / config.scaling_factor + shift

    def latents_from_distribution(self, components: Components, mean: Tensor, std: Tensor,
                                  generator: torch.Generator | None = None) -> Tensor:
        """Draw a latent from the cached distribution and scale it for the denoiser.

        Draws exactly as diffusers' DiagonalGaussianDistribution.sample(generator) does.
        """
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_latents(components, sample)

    # ------------------------------------------------------------ training
    def objective(self, cfg: TrainingConfig, components: Components) -> TrainingObjective:
        """The run's objective: the model's schedule with the configured options applied."""
        from simpletuner.models.objectives import Objective, refiner_timestep_range

        betas = components.noise_scheduler.betas
        timestep_range = None
        if self.trains_refiner_range(cfg):
            timestep_range = refiner_timestep_range(betas.numel(), cfg.refiner_training_strength,
                                                    cfg.refiner_training_invert_schedule)
        return Objective.from_config(cfg, betas, components.settings["prediction_type"], timestep_range)

    def trains_refiner_range(self, cfg: TrainingConfig) -> bool:
        return cfg.refiner_training

    def trainable_text_encoders(self, components: Components) -> list[str]:
        """Components that train_text_encoder trains (their text_outputs are differentiable); none by default."""
        return []

    def drop_captions(self, components: Components, text: Mapping[str, Tensor], empty_text: Mapping[str, Tensor],
                      keep: Tensor, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Caption dropout: where `keep` is False, use the empty caption's text outputs.

        `empty_text` is `text_outputs(components, [""])` (batch size 1, broadcast). Returns the
        new text outputs and batch; families may also drop other conditioning.
        """
        from simpletuner.models.objectives import select_per_sample

        return {key: select_per_sample(keep, value, empty_text[key]) for key, value in text.items()}, dict(batch)

    def text_cache_settings(self, cfg: TrainingConfig) -> dict[str, Any]:
        """Every option that changes `text_outputs`, for the text cache's key (families add theirs)."""
        return {"text_max_length": self.text_max_length, "tokenizer_max_length": cfg.tokenizer_max_length}

    def sample_conditioning(self, plan: ImagePlan) -> dict[str, Tensor]:
        """Per-sample conditioning tensors (no batch dim) that the collate stacks into the batch."""
        return {}

    def draw_conditioning(self, components: Components, batch: Mapping[str, Any],
                          generator: torch.Generator | None = None) -> dict[str, Any]:
        """The batch with any per-step random conditioning added, drawn after the latents.

        Called once per step before `training_loss` (e.g. DeepFloyd stage II's noise-augmented
        low-resolution image). With a generator, pass one on the latents' device. Default: the control
        latent of a ControlNet run (`draw_control_latent`), nothing else.
        """
        batch = dict(batch)
        self.draw_control_latent(components, batch, generator)
        return batch

    def draw_control_latent(self, components: Components, batch: dict[str, Any],
                            generator: torch.Generator | None = None) -> None:
        """In place: batch["control"] drawn from the cached control distribution and scaled, as diffusers'
        ControlNet pipelines encode their control image (families with `control_as_latents`)."""
        if "control_mean" in batch:
            batch["control"] = self.latents_from_distribution(components, batch.pop("control_mean"),
                                                              batch.pop("control_std"), generator)

    @abstractmethod
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """Encode captions: exactly what the text cache stores, batched on dim 0."""

    @abstractmethod
    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The denoiser's prediction for noisy model-space latents at integer timesteps."""

    def denoiser_name(self) -> str:
        return "unet"

    # ------------------------------------------------------------ ControlNet (models.controlnet)
    def controlnet_from_denoiser(self, components: Components) -> nn.Module:
        """A new ControlNet initialised from the base denoiser's weights (families with `controlnet_loader`)."""
        raise UserError(f"model_family {self.name!r} has no ControlNet")

    def control_entry(self, components: Components, pixels: Tensor) -> dict[str, Tensor]:
        """What the cache stores for control images (B, 3, H, W) in [-1, 1]: the pixels as uint8, or with
        `control_as_latents` the VAE's latent distribution (drawn each step by `draw_control_latent`)."""
        if self.control_as_latents:
            mean, std = self.encode_images(components, pixels)
            return {"control_mean": mean.float(), "control_std": std.float()}
        from simpletuner.models.controlnet import pixel_control

        return pixel_control(pixels)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The frozen denoiser's prediction steered by components["controlnet"] and batch["control"]."""
        raise UserError(f"model_family {self.name!r} has no ControlNet")

    def denoiser(self, components: Components) -> nn.Module:
        """The module that trains (the UNet or transformer)."""
        return components[self.denoiser_name()]

    def architecture(self, components: Components) -> str:
        """The base model's id in Stability AI's model spec (modelspec.architecture)."""
        return self.modelspec_architecture or self.name

    @abstractmethod
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """A diffusers pipeline over these components (validation, export), with the run's scheduler."""

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Validation images (PIL) for one prompt at one size; families add their pipeline's options.

        `init_image` is a training image of this size, for img2img families (the refiner).
        """
        return pipeline(prompt=prompt, negative_prompt=cfg.validation_negative_prompt, width=width, height=height,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        guidance_scale=cfg.validation_guidance, generator=generator,
                        num_images_per_prompt=cfg.num_validation_images).images

    def inference_scheduler(self, components: Components) -> Any:
        """The model's own scheduler class (or validation_noise_scheduler's), configured with the run's
        prediction type and schedule options."""
        import diffusers

        scheduler = components["scheduler"]
        settings = components.settings
        overrides = {"prediction_type": settings["prediction_type"], "timestep_spacing": settings["timestep_spacing"]}
        if settings["rescale_betas_zero_snr"]:
            overrides["rescale_betas_zero_snr"] = True
        chosen = settings.get("validation_scheduler")
        scheduler_class = getattr(diffusers, VALIDATION_SCHEDULERS[chosen]) if chosen else type(scheduler)
        return scheduler_class.from_config(scheduler.config, **overrides)


# ---------------------------------------------------------------- loading helpers
def declared(value: Any) -> bool:
    """model_index.json lists absent components as [null, null]."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None and value[1] is not None


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _local_only(source: str) -> bool:
    return _is_local(source) or _offline()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.sep + os.sep in source or source.count("/") > 1


def read_model_index(source: str, revision: str | None = None) -> dict[str, Any]:
    """model_index.json of a local folder or Hub repository, or a UserError saying why not."""
    return read_model_json(source, "model_index.json", revision)


def read_model_json(source: str, name: str, revision: str | None = None) -> dict[str, Any]:
    """A JSON file of a local model folder or Hub repository (model_index.json, unet/config.json), or a
    UserError saying why not."""
    if _is_local(source):
        path = Path(source).expanduser() / name
        if not path.is_file():
            raise UserError(f"{source}: not a diffusers model folder (no {name}). Point "
                            "pretrained_model_name_or_path at a folder saved with save_pretrained, or a Hub id.")
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: cannot be read as JSON ({error})") from error
    if _looks_like_path(source):
        raise UserError(f"pretrained_model_name_or_path {source!r}: no such folder")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, name, revision=revision, local_files_only=_offline())
    except Exception as error:  # hub errors come in many classes; all mean "cannot get it"
        raise UserError(f"pretrained_model_name_or_path {source!r}: cannot fetch {name}: "
                        f"{_fetch_hint(error)}") from error
    return json.loads(Path(path).read_text())


def _fetch_hint(error: Exception) -> str:
    if _offline():
        return ("offline (HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache; download it once on a "
                "machine with network, or set pretrained_model_name_or_path to a local folder")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{reason} If this machine has no network: set HF_HUB_OFFLINE=1 to use a copy already in the Hugging "
            "Face cache, or set pretrained_model_name_or_path to a local folder (saved with save_pretrained)")


def _scheduler_class(entry: Sequence[str]) -> Any:
    import diffusers

    scheduler_class = getattr(diffusers, entry[1], None)
    return scheduler_class if scheduler_class is not None else diffusers.DDPMScheduler


def _subfolder_of(path: str, name: str) -> str | None:
    """A separate component may be a whole model folder (use its subfolder) or the component alone."""
    return name if _is_local(path) and (Path(path) / name / "config.json").is_file() else None


def _t5_subfolder(path: str, name: str) -> str | None:
    """Where a shared T5 lies in a model folder: `name`, the folder itself, or its one T5 text_encoder* subfolder.

    A Hub id is read at `name` (the same component name as in this family's layout).
    """
    if not _is_local(path):
        return name
    root = Path(path).expanduser()
    if (root / name / "config.json").is_file():
        return name
    if (root / "config.json").is_file():
        return None
    for folder in sorted(root.glob("text_encoder*")):
        try:
            if json.loads((folder / "config.json").read_text()).get("model_type") == "t5":
                return folder.name
        except (OSError, json.JSONDecodeError):
            continue
    return name


def _from_pretrained(loader: Any, source: str, name: str, **kwargs: Any) -> Any:
    if kwargs.get("subfolder") is None:
        kwargs.pop("subfolder", None)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise UserError(f"{source}: cannot load {name} ({loader.__name__}): {error}") from error
