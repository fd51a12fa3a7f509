"""PixArt Sigma (model_family pixart_sigma).

Text: T5's last hidden state and its attention mask, 300 tokens by default
(PixArtSigmaPipeline.encode_prompt). The transformer predicts noise and, in as many
channels again, the variance ("learned sigma"); training uses the noise half, as the
pipeline does. Checkpoints whose transformer uses additional conditions (PixArt-alpha
at 1024 px) also take the image's resolution and aspect ratio, as PixArt's training
did: the original size (h, w) and the trained size's h / w. In the batch, as float
tensors [B, 2] in (height, width) order: "original_size" and "target_size" (both
optional; the latents' size in pixels stands in).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.models.base import (Components, ComponentSpec, ModelFamily, batch_size_conditioning,
                                     size_conditioning)
from simpletuner.models.sd import UNET_ADAPTER_PRESETS, unet_preset_name
from simpletuner.models.t5_text import encode_t5, text_length

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.data.records import ImagePlan


def learned_variance_split(prediction: Tensor, channels: int) -> Tensor:
    """The predicted-noise half of a model output that also carries the variance (2 x channels)."""
    return prediction.chunk(2, dim=1)[0] if prediction.shape[1] == 2 * channels else prediction


class PixArtSigmaFamily(ModelFamily):
    """PixArt Sigma: a DiT over 4-channel SDXL-VAE latents with a T5-XXL encoder, epsilon prediction."""

    name: ClassVar[str] = "pixart_sigma"
    flavours: ClassVar[Flavours] = flavour_tables.PIXART_SIGMA  # model_flavour -> Hub checkpoint
    modelspec_architecture: ClassVar[str] = "pixart-sigma"
    lora_loader: ClassVar[bool] = False  # LoRAs load through peft (PeftModel.from_pretrained)
    alignment: ClassVar[int] = 16  # VAE factor 8 x patch size 2
    native_resolution: ClassVar[int] = 1024  # also released at 512 and 2048 px
    default_prediction_type: ClassVar[str] = "epsilon"
    text_max_length: ClassVar[int] = 300
    t5_component: ClassVar[str | None] = "text_encoder"  # what pretrained_t5_model_name_or_path replaces
    pipeline_classes: ClassVar[tuple[str, ...]] = ("PixArtSigmaPipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("transformer", "diffusers:PixArtTransformer2DModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:T5EncoderModel"),
        ComponentSpec("tokenizer", "transformers:T5Tokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:DPMSolverMultistepScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = UNET_ADAPTER_PRESETS  # same module names
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def denoiser_name(self) -> str:
        return "transformer"

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        settings["text_max_length"] = text_length(cfg, self.text_max_length, modules["tokenizer"])
        return settings

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L]} as the pipeline's encode_prompt."""
        hidden, mask = encode_t5(components["tokenizer"], components["text_encoder"], captions,
                                 components.settings["text_max_length"])
        return {"prompt_embeds": hidden, "prompt_attention_mask": mask}

    # ------------------------------------------------------------ conditioning
    def sample_conditioning(self, plan: ImagePlan) -> dict[str, Tensor]:
        """Original and trained size, (h, w), for checkpoints with resolution/aspect conditioning."""
        sizes = size_conditioning(plan)
        return {"original_size": sizes["original_size"], "target_size": sizes["target_size"]}

    def added_conditions(self, components: Components, latents: Tensor, batch: Mapping[str, Any]) -> dict:
        """added_cond_kwargs: resolution [B, 2] and aspect_ratio [B, 1] where the checkpoint uses them."""
        if not components["transformer"].use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        original, trained, _ = batch_size_conditioning(latents, self.vae_scale_factor(components), batch)
        return {"resolution": original, "aspect_ratio": (trained[:, 0] / trained[:, 1]).reshape(-1, 1)}

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        transformer = components["transformer"]
        dtype = transformer.dtype
        added = {key: None if value is None else value.to(dtype)
                 for key, value in self.added_conditions(components, noisy_latents, batch).items()}
        prediction = transformer(noisy_latents.to(dtype), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                                 encoder_attention_mask=text["prompt_attention_mask"], timestep=timesteps,
                                 added_cond_kwargs=added, return_dict=False)[0]
        return learned_variance_split(prediction, noisy_latents.shape[1])

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                                   vae=components["vae"], transformer=components["transformer"],
                                   scheduler=self.inference_scheduler(components))

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Samples at exactly the asked size (no resolution binning), with the trained text length."""
        options = {"use_resolution_binning": False, "clean_caption": False,
                   "max_sequence_length": text_length(cfg, self.text_max_length, pipeline.tokenizer)}
        return super().sample_images(partial(pipeline, **options), cfg, prompt, width, height, generator, init_image)
