"""DeepFloyd IF, stage I and stage II (model_family deepfloyd).

Pixel space: there is no VAE. `encode_images` returns the pixels themselves as a
distribution with zero spread, the scale factor is 1 and no scaling applies, so the
"latents" of the rest of the road are images in [-1, 1].

Text: T5's last hidden state of the lower-cased caption, 77 tokens (IFPipeline.encode_prompt).
The UNet predicts noise and a learned-range variance in as many channels again; training
uses the noise half, as diffusers' IF DreamBooth training does.

Stages, by SimpleTuner's model_type: deepfloyd-full / deepfloyd-lora train stage I
(64 px), deepfloyd-stage2 / deepfloyd-stage2-lora train stage II (the 4x upscaler to
256 px); a plain full / lora trains whichever stage the model is. Stage II is
conditioned, as IFSuperResolutionPipeline conditions it, on the low-resolution image,
upscaled bilinearly to the training size, noise-augmented by the model's
image_noising_scheduler at a noise level that is also its class label, and concatenated
to the noisy input. In training the low-resolution image is the training image
downsampled by `LOW_RES_FACTOR`; `draw_conditioning` draws a level in
[0, deepfloyd_stage2_max_noise_level] and the noise per sample, and puts
"low_res_conditioning" [B, 3, H, W] and "noise_level" [B] in the batch.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.errors import UserError
from simpletuner.models.base import Components, ComponentSpec, DTypePolicy, ModelFamily, declared, read_model_index
from simpletuner.models.pixart import learned_variance_split
from simpletuner.models.sd import unet_preset_name
from simpletuner.models.t5_text import encode_t5, text_length

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig

STAGE_PIPELINES = {1: "IFPipeline", 2: "IFSuperResolutionPipeline"}
STAGE_RESOLUTION = {1: 64, 2: 256}
LOW_RES_FACTOR = 4  # stage I's 64 px -> stage II's 256 px

# IF's UNet attention (AttnAddedKVProcessor) projects the text through add_k_proj / add_v_proj;
# its blocks have no feed-forward layers.
IF_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def stage_from_model_type(model_type: str) -> int | None:
    """2 for deepfloyd-stage2(-lora), 1 for deepfloyd-full / deepfloyd-lora, None (the model's) otherwise."""
    if model_type.startswith("deepfloyd-stage2"):
        return 2
    return 1 if model_type.startswith("deepfloyd-") else None


def downsample(pixels: Tensor, factor: int = LOW_RES_FACTOR) -> Tensor:
    """The low-resolution image stage II learns to upscale: a box filter over factor x factor pixels."""
    height, width = pixels.shape[-2:]
    if height % factor or width % factor:
        raise UserError(f"DeepFloyd stage II trains on sides that are multiples of {factor} (the low-resolution "
                        f"image is 1/{factor} of them); got {width}x{height}")
    return F.interpolate(pixels, size=(height // factor, width // factor), mode="area")


def noise_augmented(noising_scheduler: Any, low_res: Tensor, size: tuple[int, int], noise: Tensor,
                    noise_level: Tensor) -> Tensor:
    """The low-resolution image as IFSuperResolutionPipeline feeds it: upscaled bilinearly, then noised."""
    upscaled = F.interpolate(low_res, size, mode="bilinear", align_corners=True)
    return noising_scheduler.add_noise(upscaled, noise, timesteps=noise_level)


class DeepFloydFamily(ModelFamily):
    """DeepFloyd IF stage I (64 px) or II (256 px): pixel space, T5, epsilon with learned-range variance."""

    name: ClassVar[str] = "deepfloyd"
    flavours: ClassVar[Flavours] = flavour_tables.DEEPFLOYD  # model_flavour -> Hub checkpoint
    modelspec_architecture: ClassVar[str] = "deepfloyd-if"
    alignment: ClassVar[int] = 8
    native_resolution: ClassVar[int] = STAGE_RESOLUTION[1]
    default_prediction_type: ClassVar[str] = "epsilon"
    latent_channels: ClassVar[int] = 3
    text_max_length: ClassVar[int] = 77
    t5_component: ClassVar[str | None] = "text_encoder"  # what pretrained_t5_model_name_or_path replaces
    pipeline_classes: ClassVar[tuple[str, ...]] = tuple(STAGE_PIPELINES.values())
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("unet", "diffusers:UNet2DConditionModel"),
        ComponentSpec("text_encoder", "transformers:T5EncoderModel"),
        ComponentSpec("tokenizer", "transformers:T5Tokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:DDPMScheduler", kind="scheduler"),
        ComponentSpec("image_noising_scheduler", "diffusers:DDPMScheduler", required=False, kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = {"attention": IF_ATTENTION}

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def default_resolution(self, cfg: TrainingConfig) -> int:
        """64 px for stage I, 256 px for stage II (named by model_type or model_flavour, else read from the model)."""
        stage = stage_from_model_type(cfg.model_type) or self._stage_from_flavour(cfg)
        if stage is None:
            index = read_model_index(cfg.pretrained_model_name_or_path, cfg.revision)
            stage = 2 if index.get("_class_name") == STAGE_PIPELINES[2] else 1
        return STAGE_RESOLUTION[stage]

    def _stage_from_flavour(self, cfg: TrainingConfig) -> int | None:
        """The stage a flavour names (i-...: I, ii-...: II), when the checkpoint is that flavour's."""
        checkpoint = self.flavours.checkpoint(cfg.model_flavour) if cfg.model_flavour else None
        if checkpoint is None or cfg.pretrained_model_name_or_path not in (None, checkpoint):
            return None
        return 2 if cfg.model_flavour.startswith("ii-") else 1

    # ------------------------------------------------------------ loading
    def load(self, cfg: TrainingConfig, dtypes: DTypePolicy | None = None) -> Components:
        """As every family loads, after checking that the model is the stage model_type names."""
        wanted = stage_from_model_type(cfg.model_type)
        if wanted is not None:
            source = cfg.pretrained_model_name_or_path
            found = read_model_index(source, cfg.revision).get("_class_name")
            if found in STAGE_PIPELINES.values() and found != STAGE_PIPELINES[wanted]:
                other = ("deepfloyd-stage2 or deepfloyd-stage2-lora" if wanted == 1
                         else "deepfloyd-full or deepfloyd-lora")
                raise UserError(f"{source}: model_type {cfg.model_type!r} trains DeepFloyd stage {wanted} "
                                f"({STAGE_PIPELINES[wanted]}), but the model is a {found}; use model_type {other} "
                                "for it, or point pretrained_model_name_or_path at a stage "
                                f"{wanted} model.")
        return super().load(cfg, dtypes)

    def check_model_index(self, source: str, index: Mapping[str, Any]) -> None:
        super().check_model_index(source, index)
        if index.get("_class_name") == STAGE_PIPELINES[2] and not declared(index.get("image_noising_scheduler")):
            raise UserError(f"{source}: the model lacks image_noising_scheduler, which DeepFloyd stage II needs")

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        settings.update(
            stage=2 if index["_class_name"] == STAGE_PIPELINES[2] else 1,
            text_max_length=text_length(cfg, self.text_max_length, modules["tokenizer"]),
            max_noise_level=cfg.deepfloyd_stage2_max_noise_level,
        )
        return settings

    # ------------------------------------------------------------ pixels instead of latents
    def vae_scale_factor(self, components: Components) -> int:
        return 1

    @torch.no_grad()
    def encode_images(self, components: Components, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The pixels themselves, with zero spread: (pixels, zeros)."""
        return pixels, torch.zeros_like(pixels)

    def scale_latents(self, components: Components, latents: Tensor) -> Tensor:
        return latents

    def unscale_latents(self, components: Components, latents: Tensor) -> Tensor:
        return latents

    def latents_from_distribution(self, components: Components, mean: Tensor, std: Tensor,
                                  generator: torch.Generator | None = None) -> Tensor:
        return mean

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77, D]} as IFPipeline.encode_prompt (clean_caption=False)."""
        hidden, _ = encode_t5(components["tokenizer"], components["text_encoder"], captions,
                              components.settings["text_max_length"])
        return {"prompt_embeds": hidden}

    # ------------------------------------------------------------ stage II conditioning
    def draw_conditioning(self, components: Components, batch: Mapping[str, Any],
                          generator: torch.Generator | None = None) -> dict[str, Any]:
        """Stage II: the noise-augmented low-resolution image and its noise level, drawn per sample."""
        batch = dict(batch)
        if components.settings["stage"] != 2:
            return batch
        pixels = batch["latents"]
        low_res = downsample(pixels)
        levels = torch.randint(0, components.settings["max_noise_level"] + 1, (pixels.shape[0],),
                               generator=generator, device=pixels.device)
        noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        batch["low_res_conditioning"] = noise_augmented(components["image_noising_scheduler"], low_res,
                                                        tuple(pixels.shape[-2:]), noise, levels)
        batch["noise_level"] = levels
        return batch

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        unet = components["unet"]
        dtype = unet.dtype
        model_input, class_labels = noisy_latents, None
        if components.settings["stage"] == 2:
            if "low_res_conditioning" not in batch:
                raise UserError("DeepFloyd stage II needs the batch's low-resolution conditioning: call "
                                "family.draw_conditioning(components, batch, generator) before the loss")
            model_input = torch.cat([noisy_latents, batch["low_res_conditioning"].to(noisy_latents.dtype)], dim=1)
            class_labels = batch["noise_level"]
        prediction = unet(model_input.to(dtype), timesteps, encoder_hidden_states=text["prompt_embeds"].to(dtype),
                          class_labels=class_labels, return_dict=False)[0]
        return learned_variance_split(prediction, noisy_latents.shape[1])

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """IFPipeline (stage I) or IFSuperResolutionPipeline (stage II), without safety checker or watermarker."""
        from diffusers import IFPipeline, IFSuperResolutionPipeline

        parts = dict(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                     unet=components["unet"], scheduler=self.inference_scheduler(components), safety_checker=None,
                     feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if components.settings["stage"] == 2:
            return IFSuperResolutionPipeline(**parts, image_noising_scheduler=components["image_noising_scheduler"])
        return IFPipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Stage I samples from the prompt; stage II upscales `init_image` (a training image, downsampled)."""
        from diffusers import IFSuperResolutionPipeline

        if isinstance(pipeline, IFSuperResolutionPipeline):
            if init_image is None:
                raise UserError("DeepFloyd stage II validation needs an input image; the datasets gave none of "
                                "this size")
            low_res = init_image.resize((width // LOW_RES_FACTOR, height // LOW_RES_FACTOR))
            pipeline = partial(pipeline, image=low_res)
        return super().sample_images(partial(pipeline, clean_caption=False), cfg, prompt, width, height, generator,
                                     init_image)
