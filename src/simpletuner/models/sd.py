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

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def architecture(self, components: Components) -> str:
        """SD 1.x, or SD 2.x (a 1024-wide text encoder) at 768 px v-prediction or 512 px epsilon."""
        if self.name != "sd2x" and components["unet"].config.cross_attention_dim != 1024:
            return "stable-diffusion-v1"
        v = components.settings["prediction_type"] == "v_prediction"
        return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"

    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77, D]}: the text encoder's last hidden state."""
        encoder = components["text_encoder"]
        tokens = tokenize(components["tokenizer"], captions)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(encoder.device)
        return {"prompt_embeds": encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]}

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        unet = components["unet"]
        return unet(noisy_latents.to(unet.dtype), timesteps, encoder_hidden_states=text["prompt_embeds"].to(unet.dtype),
                    return_dict=False)[0]

    def pipeline(self, components: Components) -> DiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            unet=components["unet"], scheduler=self.inference_scheduler(components), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )


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
