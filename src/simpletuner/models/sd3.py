"""Stable Diffusion 3 / 3.5 (model_family sd3), and what it shares with Flux: flow matching.

Text, as StableDiffusion3Pipeline.encode_prompt computes it: the penultimate hidden
states of both CLIP encoders (with projection) side by side, zero-padded to T5's width,
followed along the sequence by T5's last hidden state (tokenizer_max_length tokens,
154 by default); pooled: both CLIPs' projected outputs side by side. With
t5_padding=zero the T5 embeddings of padding tokens are zeroed (the SD3 transformer has
no text attention mask, so zeroing is how padding is kept out). Latents: 16 channels,
(x - shift_factor) * scaling_factor. The transformer takes timestep sigma * 1000.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.models.base import Components, ComponentSpec, ModelFamily
from simpletuner.models.sd import tokenize, unet_preset_name

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.flow import FlowMatchingObjective

logger = get_logger(__name__)

ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
SD3_ADAPTER_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,  # SimpleTuner's SD3 default: the image stream's attention
    "attention+ffs": ATTENTION + ("ff.net.0.proj", "ff.net.2"),
}


# ---------------------------------------------------------------- shared with Flux
def t5_text_length(cfg: TrainingConfig, family_default: int, tokenizer: Any) -> int:
    """tokenizer_max_length if set, else the family's default, at most the tokenizer's model_max_length."""
    limit = int(getattr(tokenizer, "model_max_length", None) or family_default)
    if cfg.tokenizer_max_length:
        if cfg.tokenizer_max_length > limit:
            logger.warning("tokenizer_max_length=%d exceeds the T5 tokenizer's model_max_length %d; using %d",
                           cfg.tokenizer_max_length, limit, limit)
        return min(cfg.tokenizer_max_length, limit)
    return min(family_default, limit)


@torch.no_grad()
def t5_embeddings(tokenizer: Any, encoder: Any, captions: Sequence[str], max_length: int,
                  zero_padding: bool = False) -> tuple[Tensor, Tensor]:
    """(T5 last hidden state [B, L, D], attention mask [B, L]) as SD3's and Flux's pipelines encode.

    The pipelines give the encoder no attention mask; with zero_padding the padding
    positions' embeddings are zeroed afterwards (SimpleTuner's t5_padding=zero).
    """
    tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    hidden = encoder(tokens.input_ids.to(encoder.device))[0].to(dtype=encoder.dtype)
    mask = tokens.attention_mask.to(hidden.device)
    if zero_padding:
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return hidden, mask


class FlowMatchingFamily(ModelFamily):
    """A transformer trained by flow matching over 16-channel latents (SD3, Flux)."""

    alignment: ClassVar[int] = 16  # VAE factor 8 x patch size 2
    native_resolution: ClassVar[int] = 1024
    default_prediction_type: ClassVar[str] = "flow_matching"
    latent_channels: ClassVar[int] = 16
    t5_tokenizer: ClassVar[str] = "tokenizer_3"
    t5_component: ClassVar[str | None] = "text_encoder_3"

    def denoiser_name(self) -> str:
        return "transformer"

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        if cfg.prediction_type not in (None, "flow_matching"):
            raise UserError(f"prediction_type={cfg.prediction_type!r} does not suit model_family {self.name!r}, "
                            "which is trained by flow matching; leave prediction_type unset (or 'flow_matching')")
        if cfg.validation_noise_scheduler:
            logger.warning("validation_noise_scheduler=%s is ignored for model_family %r: its DDPM-family schedulers "
                           "do not sample flow-matching models; validation uses the model's own scheduler",
                           cfg.validation_noise_scheduler, self.name)
        return {
            "prediction_type": "flow_matching",
            "t5_max_length": self.t5_max_length(cfg, modules),
            "t5_padding": cfg.t5_padding,
        }

    def t5_max_length(self, cfg: TrainingConfig, modules: Mapping[str, Any]) -> int:
        return t5_text_length(cfg, self.text_max_length, modules.get(self.t5_tokenizer))

    def text_cache_settings(self, cfg: TrainingConfig) -> dict[str, Any]:
        return {**super().text_cache_settings(cfg), "t5_padding": cfg.t5_padding,
                "t5_model": cfg.pretrained_t5_model_name_or_path}

    @staticmethod
    def _noise_scheduler(scheduler: Any, timestep_spacing: str) -> Any:
        """The model's own flow-matching scheduler (its config feeds the objective's auto-shift)."""
        return type(scheduler).from_config(scheduler.config)

    def objective(self, cfg: TrainingConfig, components: Components) -> FlowMatchingObjective:
        from simpletuner.models.flow import FlowMatchingObjective

        return FlowMatchingObjective.from_config(cfg, components["scheduler"].config)

    def inference_scheduler(self, components: Components) -> Any:
        scheduler = components["scheduler"]
        return type(scheduler).from_config(scheduler.config)

    def num_train_timesteps(self, components: Components) -> int:
        return int(components["scheduler"].config.get("num_train_timesteps", 1000))


# ---------------------------------------------------------------- SD3
class SD3Family(FlowMatchingFamily):
    """SD3 / SD3.5: MM-DiT over 16-channel latents, two CLIPs and T5."""

    name: ClassVar[str] = "sd3"
    control_as_latents: ClassVar[bool] = True  # its ControlNet takes VAE latents of the control image
    flavours: ClassVar[Flavours] = flavour_tables.SD3  # model_flavour -> Hub checkpoint
    text_max_length: ClassVar[int] = 154  # T5 tokens; SD3 was trained with 77 + 77
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("transformer", "diffusers:SD3Transformer2DModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:CLIPTextModelWithProjection"),
        ComponentSpec("tokenizer", "transformers:CLIPTokenizer", kind="tokenizer"),
        ComponentSpec("text_encoder_2", "transformers:CLIPTextModelWithProjection"),
        ComponentSpec("tokenizer_2", "transformers:CLIPTokenizer", kind="tokenizer"),
        ComponentSpec("text_encoder_3", "transformers:T5EncoderModel", required=False),
        ComponentSpec("tokenizer_3", "transformers:AutoTokenizer", kind="tokenizer", required=False),
        ComponentSpec("scheduler", "diffusers:FlowMatchEulerDiscreteScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = SD3_ADAPTER_PRESETS
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    modelspec_architecture: ClassVar[str] = "stable-diffusion-v3"
    lycoris_targets: ClassVar[tuple[str, ...]] = ("Attention", "FeedForward")
    skip_layer_guidance: ClassVar[bool] = True
    controlnet_loader: ClassVar[str | None] = "diffusers:SD3ControlNetModel"
    control_latents: ClassVar[bool] = True
    controlnet_layers: ClassVar[int] = 12  # SD3ControlNetModel.from_transformer's default depth

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        clip_uncond = cfg.sd3_clip_uncond_behaviour
        _check_skip_layers(cfg, int(modules["transformer"].config.num_layers))
        settings.update(
            clip_tokens=int(modules["tokenizer"].model_max_length),
            clip_uncond=clip_uncond,
            t5_uncond=cfg.sd3_t5_uncond_behaviour or clip_uncond,
        )
        return settings

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77 + L, D_T5], "pooled_prompt_embeds": [B, P1 + P2]}."""
        hidden, pooled = [], []
        first_dtype = components["text_encoder"].dtype  # the pipeline casts both CLIPs' states to it
        for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = components[encoder_name]
            ids = tokenize(components[tokenizer_name], captions).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2].to(dtype=first_dtype))
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(components, captions, clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5(self, components: Components, captions: Sequence[str], clip: Tensor) -> Tensor:
        length = components.settings["t5_max_length"]
        encoder = components.get("text_encoder_3")
        if encoder is None:  # SD3 without T5: zeros, as the pipeline gives
            width = components["transformer"].config.joint_attention_dim
            return torch.zeros((len(captions), length, width), device=clip.device, dtype=clip.dtype)
        hidden, _ = t5_embeddings(components["tokenizer_3"], encoder, captions, length,
                                  zero_padding=components.settings["t5_padding"] == "zero")
        return hidden

    def drop_captions(self, components: Components, text: Mapping[str, Tensor], empty_text: Mapping[str, Tensor],
                      keep: Tensor, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The empty caption where dropped, with its CLIP and/or T5 parts zeroed as sd3_*_uncond_behaviour say."""
        settings = components.settings
        empty = {key: value.clone() for key, value in empty_text.items()}
        clip_tokens = settings["clip_tokens"]
        if settings["clip_uncond"] == "zero":
            empty["prompt_embeds"][:, :clip_tokens] = 0
            empty["pooled_prompt_embeds"].zero_()
        if settings["t5_uncond"] == "zero":
            empty["prompt_embeds"][:, clip_tokens:] = 0
        return super().drop_captions(components, text, empty, keep, batch)

    # ------------------------------------------------------------ training
    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The velocity prediction; `timesteps` are sigma * 1000, which SD3's transformer takes as they are."""
        transformer = components["transformer"]
        dtype = transformer.dtype
        return transformer(hidden_states=noisy_latents.to(dtype), timestep=timesteps,
                           encoder_hidden_states=text["prompt_embeds"].to(dtype),
                           pooled_projections=text["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]

    # ------------------------------------------------------------ ControlNet
    def controlnet_from_denoiser(self, components: Components) -> Any:
        """As diffusers' train_controlnet_sd3.py: the first transformer blocks copied, no extra input channels
        (at most all blocks but the last, whose context branch is output-only)."""
        from diffusers import SD3ControlNetModel

        transformer = components["transformer"]
        layers = max(1, min(self.controlnet_layers, transformer.config.num_layers - 1))
        return SD3ControlNetModel.from_transformer(transformer, num_layers=layers, num_extra_conditioning_channels=0)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The ControlNet's block samples added to the frozen transformer's blocks."""
        transformer, controlnet = components["transformer"], components["controlnet"]
        dtype = controlnet.dtype
        samples = controlnet(hidden_states=noisy_latents.to(dtype), timestep=timesteps,
                             encoder_hidden_states=text["prompt_embeds"].to(dtype),
                             pooled_projections=text["pooled_prompt_embeds"].to(dtype),
                             controlnet_cond=batch["control"].to(dtype), return_dict=False)[0]
        dtype = transformer.dtype
        return transformer(hidden_states=noisy_latents.to(dtype), timestep=timesteps,
                           encoder_hidden_states=text["prompt_embeds"].to(dtype),
                           pooled_projections=text["pooled_prompt_embeds"].to(dtype),
                           block_controlnet_hidden_states=[sample.to(dtype) for sample in samples],
                           return_dict=False)[0]

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """StableDiffusion3Pipeline, or StableDiffusion3ControlNetPipeline when the components hold a ControlNet."""
        from diffusers import StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

        parts = dict(
            transformer=components["transformer"], scheduler=self.inference_scheduler(components),
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
            text_encoder_3=components.get("text_encoder_3"), tokenizer_3=components.get("tokenizer_3"),
        )
        if components.get("controlnet") is not None:
            return StableDiffusion3ControlNetPipeline(**parts, controlnet=components["controlnet"])
        return StableDiffusion3Pipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """As the base, with T5 at the training text length; a ControlNet pipeline samples from `init_image`,
        the control image of this size."""
        length = t5_text_length(cfg, self.text_max_length, pipeline.tokenizer_3)
        control: dict[str, Any] = {}
        if "controlnet" in pipeline.components:
            if init_image is None:
                raise UserError(f"ControlNet validation at {width}x{height} needs a control image of that size; "
                                "the conditioning datasets gave none (set validation_resolution to a trained size)")
            control = {"control_image": init_image}
        else:
            control = skip_layer_guidance(cfg)
        return pipeline(prompt=prompt, negative_prompt=cfg.validation_negative_prompt, width=width, height=height,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        guidance_scale=cfg.validation_guidance, generator=generator,
                        num_images_per_prompt=cfg.num_validation_images, max_sequence_length=length,
                        **control).images


def skip_layer_guidance(cfg: TrainingConfig) -> dict[str, Any]:
    """StableDiffusion3Pipeline's skip-layer guidance inputs from validation_guidance_skip_*; {} when off.

    The pipeline applies it only with classifier-free guidance (validation_guidance above 1).
    """
    if not cfg.validation_guidance_skip_layers:
        return {}
    return {"skip_guidance_layers": list(cfg.validation_guidance_skip_layers),
            "skip_layer_guidance_start": cfg.validation_guidance_skip_layers_start,
            "skip_layer_guidance_stop": cfg.validation_guidance_skip_layers_stop,
            "skip_layer_guidance_scale": cfg.validation_guidance_skip_scale}


def _check_skip_layers(cfg: TrainingConfig, num_layers: int) -> None:
    outside = [layer for layer in cfg.validation_guidance_skip_layers or () if layer >= num_layers]
    if outside:
        raise UserError(f"validation_guidance_skip_layers={list(cfg.validation_guidance_skip_layers)}: layer(s) "
                        f"{outside} do not exist; this transformer has blocks 0 to {num_layers - 1}")
