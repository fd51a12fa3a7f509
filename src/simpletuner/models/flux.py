"""Flux.1 dev and schnell (model_family flux).

Text, as FluxPipeline.encode_prompt computes it: CLIP-L's pooled output and T5's last
hidden state (512 tokens for dev, 256 for schnell, or tokenizer_max_length), plus T5's
attention mask, which the cache keeps so masked training can be switched on later.

Latents are packed into 2x2 patches (FluxPipeline._pack_latents) with image position ids
(FluxPipeline._prepare_latent_image_ids) and zero text ids. The transformer takes the
timestep as sigma (timesteps / 1000) and, for guidance-distilled checkpoints (dev:
transformer.config.guidance_embeds), a guidance value: flux_guidance_value (constant, 1.0
by default, which keeps dev's distillation) or, with flux_guidance_mode=random-range, one
drawn per sample in [flux_guidance_min, flux_guidance_max] by `draw_conditioning` (a batch
"guidance" tensor [B] overrides both). Schnell has no guidance embedding; guidance is unused.

flux_attention_masked_training passes a joint attention mask (text padding masked, image
tokens kept) to every attention layer through joint_attention_kwargs. diffusers' FluxPipeline
does not mask at inference; combine with t5_padding=zero so that padding carries no signal
there either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.models.base import Components, ComponentSpec
from simpletuner.models.sd import tokenize
from simpletuner.models.sd3 import FlowMatchingFamily, t5_embeddings, t5_text_length

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig

logger = get_logger(__name__)

_IMAGE_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
_CONTEXT_ATTENTION = ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
_IMAGE_FF = ("ff.net.0.proj", "ff.net.2")
_CONTEXT_FF = ("ff_context.net.0.proj", "ff_context.net.2")
_SINGLE_MLP = ("proj_mlp", "proj_out")

# SimpleTuner's flux_lora_target presets (its fused-QKV names, which diffusers' Flux lacks, left out).
FLUX_ADAPTER_PRESETS: dict[str, tuple[str, ...]] = {
    "all": _IMAGE_ATTENTION + _CONTEXT_ATTENTION,
    "mmdit": _IMAGE_ATTENTION,
    "context": _CONTEXT_ATTENTION,
    "context+ffs": _CONTEXT_ATTENTION + _CONTEXT_FF,
    "all+ffs": _IMAGE_ATTENTION + _CONTEXT_ATTENTION + _IMAGE_FF + _CONTEXT_FF + _SINGLE_MLP,
    "ai-toolkit": (_IMAGE_ATTENTION + _CONTEXT_ATTENTION + _IMAGE_FF + _CONTEXT_FF
                   + ("norm.linear", "norm1.linear", "norm1_context.linear") + _SINGLE_MLP),
    "tiny": ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"),
    "nano": ("single_transformer_blocks.7.proj_out",),
    "controlnet": (),  # with controlnet=true: the ControlNet's control layers only (models.controlnet adds them)
}


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], as FluxPipeline._pack_latents."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """[B, H/2 * W/2, 4C] -> [B, C, H, W] for latent height and width (FluxPipeline._unpack_latents)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[H/2 * W/2, 3] position ids of the packed latent, as FluxPipeline._prepare_latent_image_ids makes
    them, but built on `device` (no host-to-device copy inside the training step)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def joint_attention_mask(text_mask: Tensor, image_tokens: int) -> Tensor:
    """Bool [B, 1, 1, T + I]: text padding False, every image token True (Flux puts text first)."""
    image = torch.ones((text_mask.shape[0], image_tokens), dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]


def flux_text_length(cfg: TrainingConfig, tokenizer: Any, has_guidance: bool) -> int:
    """T5 tokens: tokenizer_max_length, else 512 for dev-like models and 256 for schnell."""
    return t5_text_length(cfg, FluxFamily.text_max_length if has_guidance else 256, tokenizer)


class FluxFamily(FlowMatchingFamily):
    """Flux.1 dev (guidance-distilled) and schnell (timestep-distilled, no guidance embedding)."""

    name: ClassVar[str] = "flux"
    control_as_latents: ClassVar[bool] = True  # its ControlNet takes VAE latents of the control image
    flavours: ClassVar[Flavours] = flavour_tables.FLUX  # model_flavour -> Hub checkpoint
    text_max_length: ClassVar[int] = 512  # dev; schnell 256
    t5_tokenizer: ClassVar[str] = "tokenizer_2"
    t5_component: ClassVar[str | None] = "text_encoder_2"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("transformer", "diffusers:FluxTransformer2DModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:CLIPTextModel"),
        ComponentSpec("tokenizer", "transformers:CLIPTokenizer", kind="tokenizer"),
        ComponentSpec("text_encoder_2", "transformers:T5EncoderModel"),
        ComponentSpec("tokenizer_2", "transformers:AutoTokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:FlowMatchEulerDiscreteScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = FLUX_ADAPTER_PRESETS
    lycoris_targets: ClassVar[tuple[str, ...]] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")
    controlnet_loader: ClassVar[str | None] = "diffusers:FluxControlNetModel"
    control_latents: ClassVar[bool] = True
    controlnet_layers: ClassVar[tuple[int, int]] = (4, 10)  # FluxControlNetModel.from_transformer's defaults

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return cfg.flux_lora_target

    def architecture(self, components: Components) -> str:
        return "flux-1-dev" if _has_guidance(components["transformer"]) else "flux-1-schnell"

    def t5_max_length(self, cfg: TrainingConfig, modules: Mapping[str, Any]) -> int:
        return flux_text_length(cfg, modules.get("tokenizer_2"), _has_guidance(modules["transformer"]))

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        guidance = _has_guidance(modules["transformer"])
        if not guidance and cfg.flux_guidance_mode == "random-range":
            logger.warning("flux_guidance_mode=random-range has no effect: this transformer has no guidance "
                           "embedding (schnell-like)")
        if not guidance and not cfg.flux_fast_schedule:
            logger.warning("this Flux transformer has no guidance embedding (schnell-like): it was distilled on "
                           "a few noise levels; consider flux_fast_schedule=true to train on them")
        settings.update(
            guidance_embeds=guidance,
            guidance_mode=cfg.flux_guidance_mode,
            guidance_value=cfg.flux_guidance_value,
            guidance_range=(cfg.flux_guidance_min, cfg.flux_guidance_max),
            attention_masked=cfg.flux_attention_masked_training,
        )
        return settings

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, L, D_T5], "pooled_prompt_embeds": [B, D_CLIP], "attention_mask": [B, L]}."""
        clip = components["text_encoder"]
        ids = tokenize(components["tokenizer"], captions).input_ids.to(clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(dtype=clip.dtype)
        hidden, mask = t5_embeddings(components["tokenizer_2"], components["text_encoder_2"], captions,
                                     components.settings["t5_max_length"],
                                     zero_padding=components.settings["t5_padding"] == "zero")
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled, "attention_mask": mask}

    # ------------------------------------------------------------ training
    def draw_conditioning(self, components: Components, batch: Mapping[str, Any],
                          generator: torch.Generator | None = None) -> dict[str, Any]:
        """With flux_guidance_mode=random-range, a guidance value per sample ("guidance" [B]); in a ControlNet run,
        the control latent drawn from its cached distribution and scaled, as FluxControlNetPipeline does."""
        batch = dict(batch)
        settings = components.settings
        if settings["guidance_mode"] == "random-range" and settings["guidance_embeds"]:
            latents = batch["latents"]
            low, high = settings["guidance_range"]
            drawn = torch.rand((latents.shape[0],), generator=generator, device=latents.device)
            batch["guidance"] = low + (high - low) * drawn
        self.draw_control_latent(components, batch, generator)
        return batch

    def guidance(self, components: Components, batch: Mapping[str, Any], size: int,
                 device: torch.device) -> Tensor | None:
        """The guidance input [B] (None for a transformer without guidance embedding)."""
        if not components.settings["guidance_embeds"]:
            return None
        given = batch.get("guidance")
        if given is not None:
            return torch.as_tensor(given, device=device).float().reshape(size)
        return torch.full((size,), float(components.settings["guidance_value"]), device=device)

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """Velocity for [B, 16, H, W] latents; packs, runs the transformer at sigma = timesteps / 1000, unpacks."""
        transformer = components["transformer"]
        height, width = noisy_latents.shape[-2:]
        inputs = self._transformer_inputs(components, noisy_latents, timesteps, text, batch, transformer.dtype)
        return unpack_latents(transformer(**inputs, return_dict=False)[0], height, width)

    def _transformer_inputs(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                            text: Mapping[str, Tensor], batch: Mapping[str, Any], dtype: torch.dtype) -> dict:
        """What the transformer (and a Flux ControlNet) take for these latents, in `dtype`."""
        device = noisy_latents.device
        size, _, height, width = noisy_latents.shape
        packed = pack_latents(noisy_latents.to(dtype))
        prompt_embeds = text["prompt_embeds"].to(dtype)
        kwargs: dict[str, Any] = {}
        if components.settings["attention_masked"]:
            kwargs["joint_attention_kwargs"] = {
                "attention_mask": joint_attention_mask(text["attention_mask"].to(device), packed.shape[1])}
        return dict(
            hidden_states=packed,
            timestep=timesteps.to(device) / self.num_train_timesteps(components),
            guidance=self.guidance(components, batch, size, device),
            pooled_projections=text["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros((prompt_embeds.shape[1], 3), device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            **kwargs,
        )

    # ------------------------------------------------------------ ControlNet
    def controlnet_from_denoiser(self, components: Components) -> Any:
        """FluxControlNetModel.from_transformer at its default depth (or the transformer's, when shallower)."""
        from diffusers import FluxControlNetModel

        transformer = components["transformer"]
        config = transformer.config
        return FluxControlNetModel.from_transformer(
            transformer, num_layers=min(self.controlnet_layers[0], config.num_layers),
            num_single_layers=min(self.controlnet_layers[1], config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The ControlNet's (packed control latent) block samples added to the frozen transformer's blocks."""
        transformer, controlnet = components["transformer"], components["controlnet"]
        height, width = noisy_latents.shape[-2:]
        inputs = self._transformer_inputs(components, noisy_latents, timesteps, text, batch, controlnet.dtype)
        blocks, single = controlnet(**inputs, controlnet_cond=pack_latents(batch["control"].to(controlnet.dtype)),
                                    return_dict=False)
        dtype = transformer.dtype
        inputs = self._transformer_inputs(components, noisy_latents, timesteps, text, batch, dtype)
        prediction = transformer(**inputs, return_dict=False, controlnet_blocks_repeat=False,
                                 controlnet_block_samples=[s.to(dtype) for s in blocks] if blocks else None,
                                 controlnet_single_block_samples=[s.to(dtype) for s in single] if single else None)[0]
        return unpack_latents(prediction, height, width)

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """FluxPipeline, or FluxControlNetPipeline when the components hold a ControlNet."""
        from diffusers import FluxControlNetPipeline, FluxPipeline

        parts = dict(
            scheduler=self.inference_scheduler(components), vae=components["vae"],
            text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
            transformer=components["transformer"],
        )
        if components.get("controlnet") is not None:
            return FluxControlNetPipeline(**parts, controlnet=components["controlnet"])
        return FluxPipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Guidance-embedded sampling at validation_guidance; with validation_guidance_real > 1 also true
        classifier-free guidance against validation_negative_prompt (FluxPipeline's true_cfg_scale)."""
        kwargs: dict[str, Any] = {}
        if cfg.validation_guidance_real > 1:
            kwargs.update(true_cfg_scale=cfg.validation_guidance_real, negative_prompt=cfg.validation_negative_prompt)
        if "controlnet" in pipeline.components:  # samples from the control image of this size
            if init_image is None:
                raise UserError(f"ControlNet validation at {width}x{height} needs a control image of that size; "
                                "the conditioning datasets gave none (set validation_resolution to a trained size)")
            kwargs["control_image"] = init_image
        length = flux_text_length(cfg, pipeline.tokenizer_2, _has_guidance(pipeline.transformer))
        return pipeline(prompt=prompt, width=width, height=height,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        guidance_scale=cfg.validation_guidance, generator=generator,
                        num_images_per_prompt=cfg.num_validation_images, max_sequence_length=length,
                        **kwargs).images


def _has_guidance(transformer: Any) -> bool:
    return bool(getattr(transformer.config, "guidance_embeds", False))
