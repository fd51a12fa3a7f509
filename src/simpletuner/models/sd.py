"""Stable Diffusion 1.x and 2.x (model_family sd1x, sd2x, or SimpleTuner's "legacy").

One CLIP text encoder; the UNet is conditioned on its last hidden state, as
StableDiffusionPipeline.encode_prompt computes it (clip_skip unset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.models.base import Components, ComponentSpec, ModelFamily

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig

ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")

UNET_ADAPTER_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention+ffs": ATTENTION + FEED_FORWARD,
}


def unet_preset_name(cfg: TrainingConfig) -> str:
    return getattr(cfg, "unet_lora_target", None) or "attention"


def tokenize(tokenizer: Any, captions: Sequence[str]) -> Any:
    """Tokens padded and truncated to the tokenizer's model_max_length, as the pipelines do."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: 4-channel latents, one CLIP encoder, epsilon or v-prediction."""

    name: ClassVar[str] = "legacy"
    flavours: ClassVar[Flavours] = flavour_tables.LEGACY  # model_flavour -> Hub checkpoint
    alignment: ClassVar[int] = 8
    native_resolution: ClassVar[int] = 512
    default_prediction_type: ClassVar[str] = "epsilon"
    text_max_length: ClassVar[int] = 77
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("unet", "diffusers:UNet2DConditionModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:CLIPTextModel"),
        ComponentSpec("tokenizer", "transformers:CLIPTokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:DDPMScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = UNET_ADAPTER_PRESETS
    controlnet_loader: ClassVar[str | None] = "diffusers:ControlNetModel"

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def architecture(self, components: Components) -> str:
        """SD 1.x, or SD 2.x (a 1024-wide text encoder) at 768 px v-prediction or 512 px epsilon."""
        if self.name != "sd2x" and components["unet"].config.cross_attention_dim != 1024:
            return "stable-diffusion-v1"
        v = components.settings["prediction_type"] == "v_prediction"
        return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"

    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77, D]}: the text encoder's last hidden state (differentiable: the caller
        chooses no_grad, or trains the text encoder)."""
        encoder = components["text_encoder"]
        tokens = tokenize(components["tokenizer"], captions)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(encoder.device)
        return {"prompt_embeds": encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]}

    def trainable_text_encoders(self, components: Components) -> list[str]:
        return ["text_encoder"]

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        unet = components["unet"]
        return unet(noisy_latents.to(unet.dtype), timesteps, encoder_hidden_states=text["prompt_embeds"].to(unet.dtype),
                    return_dict=False)[0]

    # ------------------------------------------------------------ ControlNet
    def controlnet_from_denoiser(self, components: Components) -> Any:
        from diffusers import ControlNetModel

        from simpletuner.models.controlnet import conditioning_embedding_channels

        channels = conditioning_embedding_channels(self.vae_scale_factor(components))
        return ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=channels)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """As diffusers' train_controlnet.py: the ControlNet's residuals added to the frozen UNet's blocks."""
        return unet_with_controlnet(components, noisy_latents, timesteps, text["prompt_embeds"], batch["control"])

    def pipeline(self, components: Components) -> DiffusionPipeline:
        """StableDiffusionPipeline, or StableDiffusionControlNetPipeline when the components hold a ControlNet."""
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        parts = dict(vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                     unet=components["unet"], scheduler=self.inference_scheduler(components), safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
        if components.get("controlnet") is not None:
            return StableDiffusionControlNetPipeline(**parts, controlnet=components["controlnet"])
        return StableDiffusionPipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        return sample_with_control(super().sample_images, pipeline, cfg, prompt, width, height, generator, init_image)


def sample_with_control(sample: Any, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int,
                        height: int, generator: torch.Generator, init_image: Any) -> list[Any]:
    """A ControlNet pipeline samples with its control image (`init_image`); other pipelines as `sample` does."""
    from simpletuner.errors import UserError

    if "controlnet" not in getattr(pipeline, "components", {}):  # (Kolors passes a partial of its pipeline)
        return sample(pipeline, cfg, prompt, width, height, generator, init_image)
    if init_image is None:
        raise UserError(f"ControlNet validation at {width}x{height} needs a control image of that size; the "
                        "conditioning datasets gave none (set validation_resolution to a trained size)")
    return pipeline(prompt=prompt, image=init_image, negative_prompt=cfg.validation_negative_prompt, width=width,
                    height=height, num_inference_steps=cfg.validation_num_inference_steps,
                    guidance_scale=cfg.validation_guidance, generator=generator,
                    num_images_per_prompt=cfg.num_validation_images).images


def unet_with_controlnet(components: Components, noisy_latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                         control: Tensor, added_cond_kwargs: dict[str, Tensor] | None = None) -> Tensor:
    """ControlNet residuals (control: uint8 pixels) added to the UNet's down and mid blocks."""
    from simpletuner.models.controlnet import control_pixels

    unet, controlnet = components["unet"], components["controlnet"]
    extra = {"added_cond_kwargs": {k: v.to(controlnet.dtype) for k, v in added_cond_kwargs.items()}} \
        if added_cond_kwargs else {}
    down, mid = controlnet(noisy_latents.to(controlnet.dtype), timesteps,
                           encoder_hidden_states=prompt_embeds.to(controlnet.dtype),
                           controlnet_cond=control_pixels(control).to(controlnet.dtype), return_dict=False, **extra)
    dtype = unet.dtype
    extra = {"added_cond_kwargs": {k: v.to(dtype) for k, v in added_cond_kwargs.items()}} if added_cond_kwargs else {}
    return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype),
                down_block_additional_residuals=[sample.to(dtype) for sample in down],
                mid_block_additional_residual=mid.to(dtype), return_dict=False, **extra)[0]


class SD1Family(StableDiffusionFamily):
    """Stable Diffusion 1.x: 512 px, epsilon."""

    name: ClassVar[str] = "sd1x"
    flavours: ClassVar[Flavours] = flavour_tables.SD1X  # model_flavour -> Hub checkpoint


class SD2Family(StableDiffusionFamily):
    """Stable Diffusion 2.x: 768 px v-prediction (2.x-base: 512 px epsilon; the scheduler config says which)."""

    name: ClassVar[str] = "sd2x"
    flavours: ClassVar[Flavours] = flavour_tables.SD2X  # model_flavour -> Hub checkpoint
    native_resolution: ClassVar[int] = 768
    default_prediction_type: ClassVar[str] = "v_prediction"
