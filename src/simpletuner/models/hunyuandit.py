"""Hunyuan-DiT (model_family hunyuan_dit).

Text, as HunyuanDiTPipeline.encode_prompt computes it for each of its two encoders: the
bilingual CLIP (a BertModel) and mT5 (a T5EncoderModel), each the last hidden state of
its captions padded to a fixed length, with the attention mask. The lengths are the
transformer's: it replaces padded positions by a learned embedding of exactly
text_len (77) + text_len_t5 (256) tokens, so tokenizer_max_length cannot change them.

The transformer predicts, in as many channels again, the variance ("learned sigma");
training uses the first half, as the pipeline does. Checkpoints up to v1.1 also take
image size and style conditioning: in the batch, as float tensors [B, 2] in (height,
width) / (top, left) order, "original_size", "crop_top_left" and "target_size" (all
optional: the latents' size in pixels and (0, 0) stand in), which become
`image_meta_size` = original size + target size + crop top-left; `style` is 0, the only
style the released checkpoints have. Rotary position embeddings come from diffusers'
`get_2d_rotary_pos_embed` over the grid crop the pipeline uses.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from simpletuner.errors import UserError
from simpletuner.models import flavours as flavour_tables
from simpletuner.models.base import (Components, ComponentSpec, ModelFamily, batch_size_conditioning,
                                     size_conditioning)
from simpletuner.models.flavours import Flavours
from simpletuner.models.pixart import learned_variance_split
from simpletuner.models.sd import UNET_ADAPTER_PRESETS, unet_preset_name

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.data.records import ImagePlan

# The pipeline centres its rotary grid in a 512 px square, with the VAE factor 8 written into it
# (grid = height // 8 // patch, base_size = 512 // 8 // patch).
ROPE_BASE_PIXELS, PIPELINE_VAE_FACTOR = 512, 8


def encode_text(tokenizer: Any, encoder: Any, captions: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """(last hidden state [B, L, D], attention mask [B, L]), as HunyuanDiTPipeline.encode_prompt tokenises."""
    tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                       return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device)
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0], mask


def rotary_embedding(transformer: nn.Module, latent_height: int, latent_width: int,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """(cos, sin) for the transformer's image tokens, as HunyuanDiTPipeline builds them for this latent size."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    config = transformer.config
    grid = (latent_height // config.patch_size, latent_width // config.patch_size)
    base_size = ROPE_BASE_PIXELS // PIPELINE_VAE_FACTOR // config.patch_size
    crop = get_resize_crop_region_for_grid(grid, base_size)
    return get_2d_rotary_pos_embed(config.attention_head_dim, crop, grid, device=device, output_type="pt")


class HunyuanDiTFamily(ModelFamily):
    """Hunyuan-DiT: a DiT with long skips over 4-channel latents, BERT + mT5 text, v-prediction, learned sigma."""

    name: ClassVar[str] = "hunyuan_dit"
    control_as_latents: ClassVar[bool] = True  # its ControlNet takes VAE latents of the control image
    alignment: ClassVar[int] = 16  # VAE factor 8 x patch size 2
    native_resolution: ClassVar[int] = 1024
    default_prediction_type: ClassVar[str] = "v_prediction"  # the released scheduler configs say so too
    text_max_length: ClassVar[int] = 77  # BERT; mT5 takes 256 (both: the transformer's text_len, text_len_t5)
    t5_component: ClassVar[str | None] = "text_encoder_2"  # what pretrained_t5_model_name_or_path replaces
    pipeline_classes: ClassVar[tuple[str, ...]] = ("HunyuanDiTPipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("transformer", "diffusers:HunyuanDiT2DModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "transformers:BertModel"),
        ComponentSpec("tokenizer", "transformers:BertTokenizer", kind="tokenizer"),
        ComponentSpec("text_encoder_2", "transformers:T5EncoderModel"),
        ComponentSpec("tokenizer_2", "transformers:T5Tokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:DDPMScheduler", kind="scheduler"),
    )
    adapter_presets: ClassVar[dict[str, tuple[str, ...]]] = UNET_ADAPTER_PRESETS  # attn1/attn2 and ff names
    controlnet_loader: ClassVar[str | None] = "diffusers:HunyuanDiT2DControlNetModel"
    control_latents: ClassVar[bool] = True
    lycoris_targets: ClassVar[tuple[str, ...]] = ("HunyuanDiTBlock",)
    block_lists: ClassVar[tuple[str, ...]] = ("blocks",)
    # HunyuanDiTPipeline has no diffusers LoRA loader (diffusers 0.42): its LoRA is saved in peft's format
    lora_loader: ClassVar[bool] = False
    flavours: ClassVar[Flavours] = flavour_tables.HUNYUAN_DIT  # model_flavour -> Hub checkpoint

    def adapter_preset_name(self, cfg: TrainingConfig) -> str:
        return unet_preset_name(cfg)

    def denoiser_name(self) -> str:
        return "transformer"

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        transformer = modules["transformer"]
        config = transformer.config
        if cfg.gradient_checkpointing and not getattr(transformer, "_supports_gradient_checkpointing", False):
            raise UserError(f"gradient_checkpointing=true does not suit model_family {self.name!r}: diffusers' "
                            f"{type(transformer).__name__} cannot checkpoint its blocks; turn it off")
        if cfg.tokenizer_max_length:
            raise UserError(f"tokenizer_max_length={cfg.tokenizer_max_length} does not suit model_family "
                            f"{self.name!r}: its transformer takes exactly {config.text_len} BERT and "
                            f"{config.text_len_t5} mT5 tokens (text_len, text_len_t5 in transformer/config.json); "
                            "leave tokenizer_max_length unset")
        settings = super().settings_from(cfg, index, modules)
        settings.update(text_len=config.text_len, text_len_t5=config.text_len_t5)
        return settings

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, 77, D], "prompt_attention_mask": [B, 77]} from BERT and
        {"prompt_embeds_2": [B, 256, D2], "prompt_attention_mask_2": [B, 256]} from mT5."""
        settings = components.settings
        embeds, mask = encode_text(components["tokenizer"], components["text_encoder"], captions,
                                   settings["text_len"])
        embeds_2, mask_2 = encode_text(components["tokenizer_2"], components["text_encoder_2"], captions,
                                       settings["text_len_t5"])
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask,
                "prompt_embeds_2": embeds_2, "prompt_attention_mask_2": mask_2}

    # ------------------------------------------------------------ conditioning
    def sample_conditioning(self, plan: ImagePlan) -> dict[str, Tensor]:
        """Original size, crop top-left and trained size, (h, w) / (top, left), from an ImagePlan."""
        return size_conditioning(plan)

    def image_meta_size(self, components: Components, latents: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """[B, 6]: (orig_h, orig_w, target_h, target_w, crop_top, crop_left), as the pipeline's add_time_ids."""
        return torch.cat(batch_size_conditioning(latents, self.vae_scale_factor(components), batch), dim=1)

    def predict(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The noise half of the transformer's output. Timesteps go in the transformer's dtype, as the
        pipeline passes them (its timestep embedding runs in the timesteps' dtype). Image size and style
        reach only a transformer that takes them (use_style_cond_and_image_meta_size: up to v1.1)."""
        transformer = components["transformer"]
        inputs = self._inputs(components, transformer, noisy_latents, timesteps, text, batch)
        return learned_variance_split(transformer(**inputs)[0], noisy_latents.shape[1])

    def _inputs(self, components: Components, model: Any, noisy_latents: Tensor, timesteps: Tensor,
                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Any]:
        """What the transformer (or its ControlNet, `model`) takes, in the model's dtype."""
        dtype = model.dtype
        device = noisy_latents.device
        transformer = components["transformer"]
        rotary = rotary_embedding(transformer, noisy_latents.shape[-2], noisy_latents.shape[-1], device)
        meta_size = style = None
        if transformer.config.use_style_cond_and_image_meta_size:
            meta_size = self.image_meta_size(components, noisy_latents, batch).to(dtype)
            style = torch.zeros(noisy_latents.shape[0], dtype=torch.long, device=device)
        return dict(hidden_states=noisy_latents.to(dtype), timestep=timesteps.to(dtype),
                    encoder_hidden_states=text["prompt_embeds"].to(dtype),
                    text_embedding_mask=text["prompt_attention_mask"],
                    encoder_hidden_states_t5=text["prompt_embeds_2"].to(dtype),
                    text_embedding_mask_t5=text["prompt_attention_mask_2"],
                    image_meta_size=meta_size, style=style, image_rotary_emb=rotary, return_dict=False)

    # ------------------------------------------------------------ ControlNet
    def controlnet_from_denoiser(self, components: Components) -> Any:
        from diffusers import HunyuanDiT2DControlNetModel

        """As HunyuanDiT2DControlNetModel.from_transformer, with every size of the transformer's config (that
        method leaves pooled_projection_dim and use_style_cond_and_image_meta_size at v1.2's values and reads a
        transformer_num_layers the transformer's config does not have)."""
        transformer = components["transformer"]
        config = transformer.config
        names = ("activation_fn", "attention_head_dim", "cross_attention_dim", "cross_attention_dim_t5",
                 "hidden_size", "in_channels", "mlp_ratio", "num_attention_heads", "patch_size", "sample_size",
                 "text_len", "text_len_t5", "pooled_projection_dim", "use_style_cond_and_image_meta_size")
        controlnet = HunyuanDiT2DControlNetModel(conditioning_channels=3, transformer_num_layers=config.num_layers,
                                                 **{name: config[name] for name in names})
        controlnet.load_state_dict(transformer.state_dict(), strict=False)  # its own layers keep their init
        return controlnet.to(transformer.dtype)

    def predict_with_controlnet(self, components: Components, noisy_latents: Tensor, timesteps: Tensor,
                                text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """The ControlNet's block samples added to the frozen transformer's blocks, as the pipeline does."""
        transformer, controlnet = components["transformer"], components["controlnet"]
        samples = controlnet(**self._inputs(components, controlnet, noisy_latents, timesteps, text, batch),
                             controlnet_cond=batch["control"].to(controlnet.dtype))[0]
        inputs = self._inputs(components, transformer, noisy_latents, timesteps, text, batch)
        prediction = transformer(**inputs, controlnet_block_samples=[s.to(transformer.dtype) for s in samples])[0]
        return learned_variance_split(prediction, noisy_latents.shape[1])

    # ------------------------------------------------------------ pipelines
    def pipeline(self, components: Components) -> DiffusionPipeline:
        """HunyuanDiTPipeline, or HunyuanDiTControlNetPipeline when the components hold a ControlNet."""
        from diffusers import HunyuanDiTControlNetPipeline, HunyuanDiTPipeline

        parts = dict(vae=components["vae"], text_encoder=components["text_encoder"],
                     tokenizer=components["tokenizer"], transformer=components["transformer"],
                     scheduler=self.inference_scheduler(components), safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False,
                     text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"])
        if components.get("controlnet") is not None:
            return HunyuanDiTControlNetPipeline(**parts, controlnet=components["controlnet"])
        return HunyuanDiTPipeline(**parts)

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Samples at exactly the asked size (no resolution binning to the pipeline's ten shapes); a ControlNet
        pipeline samples from `init_image`, the control image of this size."""
        options: dict[str, Any] = {"use_resolution_binning": False}
        if "controlnet" in pipeline.components:
            if init_image is None:
                raise UserError(f"ControlNet validation at {width}x{height} needs a control image of that size; "
                                "the conditioning datasets gave none (set validation_resolution to a trained size)")
            options["control_image"] = init_image
        return super().sample_images(partial(pipeline, **options), cfg, prompt, width, height, generator, init_image)
