"""Denoisers at their published sizes, with random weights, and inputs shaped as the cache gives them.

Each `Architecture` holds the literal configuration of the released checkpoint's denoiser (copied
from its `config.json`; no network needed), a `tiny` configuration of the same classes for the CPU
check, the shapes of what the text/latent caches hand the training step (latents, encoder hidden
states, pooled embeddings, SDXL time ids, Flux ids and guidance, PixArt's mask, Hunyuan-DiT's second
text stream, masks and image meta size), and how the
denoiser is called. No text encoder or VAE is built: the arithmetic is that of the real denoiser.

Full-size models are instantiated directly on the target device (and in the target dtype), so a
12B-parameter Flux does not first materialise in fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# --- published configurations (denoiser config.json of each release) --------------------------------

SD15_UNET = {  # runwayml/stable-diffusion-v1-5, unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

FLUX_DEV = {  # black-forest-labs/FLUX.1-dev, transformer/config.json
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

PIXART_SIGMA_1024 = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
    # (less the Transformer2DModel-only keys PixArtTransformer2DModel does not take: double_self_attention,
    # only_cross_attention, use_linear_projection, all False there)
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}

HUNYUAN_DIT_V12 = {  # Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers, transformer/config.json (1.5B parameters)
    "activation_fn": "gelu-approximate",
    "attention_head_dim": 88,
    "cross_attention_dim": 1024,
    "cross_attention_dim_t5": 2048,
    "hidden_size": 1408,
    "in_channels": 4,
    "learn_sigma": True,
    "mlp_ratio": 4.3637,
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_layers": 40,
    "patch_size": 2,
    "pooled_projection_dim": 1024,
    "sample_size": 128,
    "text_len": 77,
    "text_len_t5": 256,
    "use_style_cond_and_image_meta_size": False,
}

# --- tiny configurations: same classes, same code paths, a few kB of weights ------------------------

SD15_TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 8,
}

SDXL_TINY = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD3_TINY = {
    "attention_head_dim": 8,
    "caption_projection_dim": 32,
    "in_channels": 16,
    "joint_attention_dim": 32,
    "num_attention_heads": 4,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
    "sample_size": 8,
}

FLUX_TINY = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
    "patch_size": 1,
    "pooled_projection_dim": 32,
}

PIXART_TINY = {
    **PIXART_SIGMA_1024,
    "attention_head_dim": 8,
    "caption_channels": 32,
    "cross_attention_dim": 32,
    "interpolation_scale": 1,
    "num_attention_heads": 4,
    "num_layers": 2,
    "sample_size": 8,
}

HUNYUAN_DIT_TINY = {
    **HUNYUAN_DIT_V12,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "cross_attention_dim_t5": 32,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_layers": 4,
    "pooled_projection_dim": 32,
    "sample_size": 8,
    "text_len": 8,
    "text_len_t5": 8,
}

# LoRA targets of diffusers' example scripts for each family (train_text_to_image_lora.py,
# train_text_to_image_lora_sdxl.py, train_dreambooth_lora_sd3.py, train_dreambooth_lora_flux.py).
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
MMDIT_LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
FLUX_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


@dataclass(frozen=True)
class TextShape:
    """What the text cache holds for one caption."""

    tokens: int
    width: int
    pooled: int = 0  # 0: no pooled embedding


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    model_class: str  # diffusers class name
    config: dict[str, Any]
    tiny_config: dict[str, Any]
    text: TextShape
    tiny_text: TextShape
    latent_channels: int
    objective: str  # "epsilon" (DDPM noise) or "flow" (rectified flow, velocity = noise - x0)
    lora_targets: tuple[str, ...]
    default_resolution: int
    block_classes: tuple[str, ...]  # repeated blocks for regional compilation
    is_unet: bool = False
    call: Callable[..., torch.Tensor] = field(default=None, repr=False)  # type: ignore[assignment]

    def model_config(self, tiny: bool) -> dict[str, Any]:
        return dict(self.tiny_config if tiny else self.config)

    def text_shape(self, tiny: bool) -> TextShape:
        return self.tiny_text if tiny else self.text


# --- how each denoiser is called with a cached batch --------------------------------------------------


def _call_unet(model, noisy, timesteps, batch):
    cond = None
    if "time_ids" in batch:
        cond = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    return model(noisy, timesteps, batch["encoder_hidden_states"], added_cond_kwargs=cond, return_dict=False)[0]


def _call_sd3(model, noisy, timesteps, batch):
    return model(
        hidden_states=noisy,
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled"],
        timestep=timesteps,
        return_dict=False,
    )[0]


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_flux_latents` for latent size (height, width)."""
    b, _, c4 = packed.shape
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(latent_height: int, latent_width: int) -> torch.Tensor:
    """Positional ids of the packed image tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(latent_height // 2, latent_width // 2, 3)
    ids[..., 1] += torch.arange(latent_height // 2)[:, None]
    ids[..., 2] += torch.arange(latent_width // 2)[None, :]
    return ids.reshape(-1, 3)


def _call_flux(model, noisy, timesteps, batch):
    h, w = noisy.shape[-2:]
    out = model(
        hidden_states=pack_flux_latents(noisy),
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled"],
        timestep=timesteps / 1000,
        img_ids=batch["img_ids"],
        txt_ids=batch["txt_ids"],
        guidance=batch["guidance"],
        return_dict=False,
    )[0]
    return unpack_flux_latents(out, h, w)


def _call_pixart(model, noisy, timesteps, batch):
    out = model(
        noisy,
        encoder_hidden_states=batch["encoder_hidden_states"],
        encoder_attention_mask=batch["encoder_attention_mask"],
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    return out.chunk(2, dim=1)[0]  # learned sigma: the first half is the noise prediction


def hunyuan_rotary_embedding(model, latent_height: int, latent_width: int, device) -> tuple[torch.Tensor, ...]:
    """(cos, sin) of the image tokens, as HunyuanDiTPipeline builds them (its grid crop in a 512 px square)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    patch = model.config.patch_size
    grid = (latent_height // patch, latent_width // patch)
    crop = get_resize_crop_region_for_grid(grid, 512 // VAE_SCALE // patch)
    return get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, crop, grid, device=device, output_type="pt")


def _call_hunyuan_dit(model, noisy, timesteps, batch):
    out = model(
        noisy,
        timesteps.to(noisy.dtype),  # as the pipeline passes them: its timestep embedding runs in their dtype
        encoder_hidden_states=batch["encoder_hidden_states"],
        text_embedding_mask=batch["encoder_attention_mask"],
        encoder_hidden_states_t5=batch["encoder_hidden_states_t5"],
        text_embedding_mask_t5=batch["encoder_attention_mask_t5"],
        image_meta_size=batch["image_meta_size"],
        style=torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device),
        image_rotary_emb=hunyuan_rotary_embedding(model, *noisy.shape[-2:], noisy.device),
        return_dict=False,
    )[0]
    return out.chunk(2, dim=1)[0]  # learned sigma


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(
        "sd15", "SD 1.5 UNet", "UNet2DConditionModel", SD15_UNET, SD15_TINY,
        TextShape(77, 768), TextShape(8, 32), 4, "epsilon", UNET_LORA_TARGETS, 512,
        ("BasicTransformerBlock", "ResnetBlock2D"), True, _call_unet,
    ),
    "sdxl": Architecture(
        "sdxl", "SDXL base UNet", "UNet2DConditionModel", SDXL_UNET, SDXL_TINY,
        TextShape(77, 2048, 1280), TextShape(8, 32, 32), 4, "epsilon", UNET_LORA_TARGETS, 1024,
        ("BasicTransformerBlock", "ResnetBlock2D"), True, _call_unet,
    ),
    "sd3": Architecture(
        "sd3", "SD3-medium MMDiT", "SD3Transformer2DModel", SD3_MEDIUM, SD3_TINY,
        TextShape(77 + 256, 4096, 2048), TextShape(8, 32, 32), 16, "flow", MMDIT_LORA_TARGETS, 1024,
        ("JointTransformerBlock",), False, _call_sd3,
    ),
    "flux": Architecture(
        "flux", "Flux.1-dev", "FluxTransformer2DModel", FLUX_DEV, FLUX_TINY,
        TextShape(512, 4096, 768), TextShape(8, 32, 32), 16, "flow", FLUX_LORA_TARGETS, 1024,
        ("FluxTransformerBlock", "FluxSingleTransformerBlock"), False, _call_flux,
    ),
    "pixart": Architecture(
        "pixart", "PixArt Sigma 1024", "PixArtTransformer2DModel", PIXART_SIGMA_1024, PIXART_TINY,
        TextShape(300, 4096), TextShape(8, 32), 4, "epsilon", UNET_LORA_TARGETS, 1024,
        ("BasicTransformerBlock",), False, _call_pixart,
    ),
    # (text: the BERT stream; make_batch adds mT5's 256 x 2048. The reference's DDPM step draws an epsilon
    # target; Hunyuan-DiT trains on v-prediction, whose target costs the same arithmetic.)
    "hunyuan_dit": Architecture(
        "hunyuan_dit", "Hunyuan-DiT v1.2", "HunyuanDiT2DModel", HUNYUAN_DIT_V12, HUNYUAN_DIT_TINY,
        TextShape(77, 1024), TextShape(8, 32), 4, "epsilon", UNET_LORA_TARGETS, 1024,
        ("HunyuanDiTBlock",), False, _call_hunyuan_dit,
    ),
}

VAE_SCALE = 8  # every family here: latents are 1/8 of the image side


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        from simpletuner.errors import UserError

        raise UserError(f"--model {name!r} is not a benchmarked architecture; use one of {sorted(ARCHITECTURES)}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(arch: Architecture, *, tiny: bool, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The denoiser with random weights, created on `device` in `dtype` (no CPU detour)."""
    import diffusers

    cls = getattr(diffusers, arch.model_class)
    with torch.device(device), _default_dtype(dtype):
        model = cls(**arch.model_config(tiny))
    for buffer in model.buffers():  # e.g. sin-cos position tables built as explicit float32
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model


def make_batch(
    arch: Architecture, *, batch: int, resolution: int, tiny: bool, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """One cached batch on the CPU, shaped exactly as the latent and text caches return it."""
    side = resolution // VAE_SCALE
    text = arch.text_shape(tiny)
    g = generator

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    out = {
        "latents": randn(batch, arch.latent_channels, side, side),
        "encoder_hidden_states": randn(batch, text.tokens, text.width),
    }
    if text.pooled:
        out["pooled"] = randn(batch, text.pooled)
    if arch.name == "sdxl":
        # original size, crop top-left, target size: (h, w, 0, 0, h, w)
        out["time_ids"] = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        out["time_ids"] = out["time_ids"].repeat(batch, 1)
    if arch.name == "flux":
        out["img_ids"] = flux_image_ids(side, side)
        out["txt_ids"] = torch.zeros(text.tokens, 3)
        out["guidance"] = torch.full((batch,), 3.5)
    if arch.name == "pixart":
        out["encoder_attention_mask"] = torch.ones(batch, text.tokens)
    if arch.name == "hunyuan_dit":
        config = arch.model_config(tiny)
        out["encoder_attention_mask"] = torch.ones(batch, text.tokens)
        out["encoder_hidden_states_t5"] = randn(batch, config["text_len_t5"], config["cross_attention_dim_t5"])
        out["encoder_attention_mask_t5"] = torch.ones(batch, config["text_len_t5"])
        # original size, target size, crop top-left: (h, w, h, w, 0, 0)
        out["image_meta_size"] = torch.tensor([resolution, resolution, resolution, resolution, 0, 0],
                                              dtype=torch.float32).repeat(batch, 1)
    return out


def check_resolution(arch: Architecture, resolution: int) -> None:
    """Latent sides must divide into the model's patches (and UNet down-samplings)."""
    from simpletuner.errors import UserError

    multiple = 64 if arch.is_unet else 16  # UNets down-sample up to 3 times; DiTs patchify by 2
    if resolution <= 0 or resolution % multiple:
        raise UserError(f"--resolution {resolution} does not suit {arch.name}: use a positive multiple of {multiple}")
