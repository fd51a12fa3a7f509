"""Stable Diffusion XL, base and refiner (model_family sdxl).

Text: the penultimate hidden states of both CLIP encoders, concatenated, plus the
pooled projection of text_encoder_2 (StableDiffusionXLPipeline.encode_prompt). The
refiner has only text_encoder_2.

Per-sample conditioning ("micro-conditioning") in the batch, as float tensors [B, 2]
in SDXL's (height, width) / (top, left) order:
- "original_size": the image's size before resizing and cropping;
- "crop_top_left": where the crop starts in the resized image;
- "target_size": the trained size (optional: defaults to the latents' size in pixels).
The refiner replaces target_size by an aesthetic score: "aesthetic_score" [B] (optional:
defaults to data_aesthetic_score). `sample_conditioning(plan)` builds them from an ImagePlan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.errors import UserError
from simpletuner.models.base import Components, ComponentSpec, ModelFamily, declared, size_conditioning
from simpletuner.models.sd import (UNET_ADAPTER_PRESETS, sample_with_control, tokenize, unet_preset_name,
                                   unet_with_controlnet)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.data.records import ImagePlan

SIZE_KEYS = ("original_size", "crop_top_left", "target_size", "aesthetic_score")


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """[B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as the SDXL pipeline builds them."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def refiner_time_ids(original_size: Tensor, crop_top_left: Tensor, aesthetic_score: Tensor) -> Tensor:
    """[B, 5]: (orig_h, orig_w, crop_top, crop_left, aesthetic_score), the refiner's variant."""
    return torch.cat([original_size, crop_top_left, aesthetic_score.reshape(-1, 1)], dim=1).float()


class SDXLFamily(ModelFamily):
    """SDXL base and refiner. The refiner is recognised by its pipeline's requires_aesthetics_score."""

    name: ClassVar[str] = "sdxl"
    flavours: ClassVar[Flavours] = flavour_tables.SDXL  # model_flavour -> Hub checkpoint
    alignment: ClassVar[int] = 64
    native_resolution: ClassVar[int] = 1024
    default_prediction_type: ClassVar[str] = "epsilon"
    text_max_length: ClassVar[int] = 77
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("unet", "diffusers:UNet2DConditionModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:CLIPTextModel", required=False),
        ComponentSpec("tokenizer", "transformers:CLIPTokenizer", kind="tokenizer", required=False),
        ComponentSpec("text_encoder_2", "transformers:CLIPTextModelWithProjection"),
        ComponentSpec("tokenizer_2", "transformers:CLIPTokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:EulerDiscreteScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = UNET_ADAPTER_PRESETS
    modelspec_architecture: ClassVar[str] = "stable-diffusion-xl-v1-base"
    controlnet_loader: ClassVar[str | None] = "diffusers:ControlNetModel"

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def architecture(self, components: Components) -> str:
        if components.pipeline_class == "StableDiffusionXLImg2ImgPipeline":
            return "stable-diffusion-xl-v1-refiner"
        return self.modelspec_architecture

    def check_model_index(self, source: str, index: Mapping[str, Any]) -> None:
        super().check_model_index(source, index)
        if not index.get("requires_aesthetics_score", False):
            missing = [name for name in ("text_encoder", "tokenizer") if not declared(index.get(name))]
            if missing:
                raise UserError(f"{source}: the model lacks {', '.join(missing)}, which an SDXL base model needs "
                                "(only the refiner, with requires_aesthetics_score, goes without)")

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        settings.update(
            is_refiner=bool(index.get("requires_aesthetics_score", False)),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            aesthetic_score=cfg.data_aesthetic_score,
            drop_size_conditioning=cfg.caption_dropout_size_conditioning,
        )
        return settings

    # ------------------------------------------------------------ text
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77, D1+D2] (refiner: D2), "pooled_prompt_embeds": [B, P]}; differentiable
        (the caller chooses no_grad, or trains the text encoders)."""
        hidden, pooled = [], None
        for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = components.get(encoder_name)
            if encoder is None:
                continue
            ids = tokenize(components[tokenizer_name], captions).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def trainable_text_encoders(self, components: Components) -> list[str]:
        return [name for name in ("text_encoder", "text_encoder_2") if components.get(name) is not None]

    def drop_captions(self, components: Components, text: Mapping[str, Tensor], empty_text: Mapping[str, Tensor],
                      keep: Tensor, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Empty caption where dropped (zeros if the model forces zeros for it), and zeroed time ids."""
        if components.settings["force_zeros_for_empty_prompt"]:
            empty_text = {key: torch.zeros_like(value[:1]) for key, value in text.items()}
        text, batch = super().drop_captions(components, text, empty_text, keep, batch)
        if components.settings["drop_size_conditioning"]:
            batch["size_conditioning_keep"] = keep
        return text, batch

    # ------------------------------------------------------------ conditioning
    def sample_conditioning(self, plan: ImagePlan) -> dict[str, Tensor]:
        """Per-sample size conditioning from an ImagePlan ((width, height) there, (h, w) here)."""
        return size_conditioning(plan)

    def time_ids(self, components: Components, latents: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """add_time_ids for the UNet from the batch's size conditioning."""
        device = latents.device
        original = torch.as_tensor(batch["original_size"], device=device).float().reshape(-1, 2)
        crop = torch.as_tensor(batch["crop_top_left"], device=device).float().reshape(-1, 2)
        if components.settings["is_refiner"]:
            score = batch.get("aesthetic_score")
            if score is None:
                score = torch.full((latents.shape[0],), components.settings["aesthetic_score"])
            ids = refiner_time_ids(original, crop, torch.as_tensor(score, device=device).float())
        else:
            target = batch.get("target_size")
            if target is None:
                scale = self.vae_scale_factor(components)
                target = torch.tensor([latents.shape[-2] * scale, latents.shape[-1] * scale]).expand(len(original), 2)
            ids = sdxl_time_ids(original, crop, torch.as_tensor(target, device=device).float().reshape(-1, 2))
        keep = batch.get("size_conditioning_keep")
        if keep is not None:
            ids = ids * keep.to(device=device, dtype=ids.dtype)[:, None]
        return ids

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        unet = components["unet"]
        dtype = unet.dtype  # a frozen half-precision base under LoRA takes half-precision inputs
        added = {"text_embeds": text["pooled_prompt_embeds"].to(dtype),
                 "time_ids": self.time_ids(components, noisy_latents, batch).to(dtype)}
        return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=text["prompt_embeds"].to(dtype),
                    added_cond_kwargs=added, return_dict=False)[0]

    # ------------------------------------------------------------ ControlNet
    def controlnet_from_denoiser(self, components: Components) -> Any:
        from diffusers import ControlNetModel

        if components.settings["is_refiner"]:
            raise UserError("controlnet=true: the SDXL refiner has no ControlNet pipeline in diffusers; train the "
                            "ControlNet on an SDXL base model")
        from simpletuner.models.controlnet import conditioning_embedding_channels

        channels = conditioning_embedding_channels(self.vae_scale_factor(components))
        return ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=channels)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """As diffusers' train_controlnet_sdxl.py: both networks take the pooled text and the time ids."""
        added = {"text_embeds": text["pooled_prompt_embeds"],
                 "time_ids": self.time_ids(components, noisy_latents, batch)}
        return unet_with_controlnet(components, noisy_latents, timesteps, text["prompt_embeds"], batch["control"],
                                    added)

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """StableDiffusionXLPipeline, or StableDiffusionXLImg2ImgPipeline for the refiner."""
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        parts = dict(
            vae=components["vae"], text_encoder=components.get("text_encoder"),
            text_encoder_2=components["text_encoder_2"], tokenizer=components.get("tokenizer"),
            tokenizer_2=components["tokenizer_2"], unet=components["unet"],
            scheduler=self.inference_scheduler(components),
            force_zeros_for_empty_prompt=components.settings["force_zeros_for_empty_prompt"],
            add_watermarker=False,
        )
        if components.settings["is_refiner"]:
            return StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True)
        if components.get("controlnet") is not None:
            from diffusers import StableDiffusionXLControlNetPipeline

            return StableDiffusionXLControlNetPipeline(**parts, controlnet=components["controlnet"])
        return StableDiffusionXLPipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """The refiner validates img2img: it refines a training image of this size."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        if not isinstance(pipeline, StableDiffusionXLImg2ImgPipeline):
            return sample_with_control(super().sample_images, pipeline, cfg, prompt, width, height, generator,
                                       init_image)
        if init_image is None:
            raise UserError("refiner validation needs an input image; the datasets gave none of this size")
        strength = cfg.refiner_training_strength if cfg.refiner_training else 0.3
        strength = max(strength, 1.0 / cfg.validation_num_inference_steps)  # at least one denoising step
        return pipeline(prompt=prompt, negative_prompt=cfg.validation_negative_prompt, image=init_image,
                        strength=strength,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        guidance_scale=cfg.validation_guidance, generator=generator,
                        num_images_per_prompt=cfg.num_validation_images).images


class SDXLRefinerFamily(SDXLFamily):
    """The SDXL refiner by name ("sdxl_refiner"): as sdxl, and it must be a refiner."""

    name: ClassVar[str] = "sdxl_refiner"
    flavours: ClassVar[Flavours] = flavour_tables.SDXL  # model_flavour -> Hub checkpoint
    controlnet_loader: ClassVar[str | None] = None  # diffusers has no ControlNet pipeline for the refiner

    def check_model_index(self, source: str, index: Mapping[str, Any]) -> None:
        super().check_model_index(source, index)
        if not index.get("requires_aesthetics_score", False):
            raise UserError(f"{source}: not an SDXL refiner (model_index.json has no requires_aesthetics_score: "
                            "true); use model_family 'sdxl' for a base model")
