"""Tiny random components (VAE, text encoders, UNets) built from the real classes.

Sizes follow the real models' shapes in miniature: distinct widths for each text
encoder so that a mix-up between them fails loudly, a VAE that downsamples by 4
(not 2, so it cannot be confused with a transformer's patch size of 2), and
latent statistics measured at build time so `scaling_factor`/`shift_factor`
bring latents to about zero mean and unit variance, as the real values do.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch

VAE_BLOCKS = (16, 32, 32)  # three levels: vae_scale_factor 4
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCKS) - 1)
VAE_BLOCKS_8X = (16, 32, 32, 32)  # four levels: vae_scale_factor 8, for pipelines that assume the real VAE's 8


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Each component gets its own seed, so it does not depend on build order,
    and the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        yield


def vae(latent_channels: int, sample_size: int, *, shift: bool, seed: int,
        blocks: tuple[int, ...] = VAE_BLOCKS) -> Any:
    """AutoencoderKL with calibrated `scaling_factor` (and `shift_factor` when `shift`).

    16-channel VAEs drop the quant convs as SD3's and Flux's do. `blocks`: the channels of
    each level (VAE_BLOCKS_8X for a pipeline that hard-codes the factor 8, as Hunyuan-DiT's).
    """
    from diffusers import AutoencoderKL

    flux_like = latent_channels == 16
    with seeded(seed, "vae"):
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(blocks),
            up_block_types=("UpDecoderBlock2D",) * len(blocks),
            block_out_channels=blocks,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=sample_size,
            use_quant_conv=not flux_like,
            use_post_quant_conv=not flux_like,
        )
    _calibrate(model, sample_size, shift=shift, seed=seed)
    return model


def calibration_images(size: int, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients plus texture in [-1, 1], shaped (count, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    images = []
    for _ in range(count):
        a, b, c = torch.rand(3, 3, 1, 1, generator=generator) * 2 - 1
        freq = 1 + 4 * torch.rand(1, generator=generator)
        smooth = a * xx + b * yy + 0.5 * c * torch.sin(freq * 3.1416 * (xx + yy))
        noise = 0.2 * torch.randn(3, size, size, generator=generator)
        images.append((smooth + noise).clamp(-1, 1))
    return torch.stack(images)


@torch.no_grad()
def _calibrate(model: Any, size: int, *, shift: bool, seed: int) -> None:
    latents = model.encode(calibration_images(size, seed=seed)).latent_dist.mean
    if shift:
        mean, std = latents.mean().item(), latents.std().item()
        model.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1 / std, 4))
    else:
        rms = latents.pow(2).mean().sqrt().item()
        model.register_to_config(scaling_factor=round(1 / rms, 4))


def clip_text(tokenizer: Any, hidden: int, *, projection: bool, seed: int, name: str) -> Any:
    """CLIPTextModel, or CLIPTextModelWithProjection (projection_dim = hidden, as in SDXL/SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        projection_dim=hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu" if hidden <= 32 else "gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with seeded(seed, name):
        return cls(config)


def bert_text(tokenizer: Any, hidden: int, *, seed: int) -> Any:
    """A BertModel over the tiny WordPiece vocabulary (Hunyuan-DiT's bilingual CLIP is a BERT)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    with seeded(seed, "bert"):
        return BertModel(config)


def t5_encoder(tokenizer: Any, d_model: int, *, seed: int, name: str = "t5") -> Any:
    """A T5 v1.1-style encoder (gated GELU, untied embeddings) over the tiny T5 vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with seeded(seed, name):
        return T5EncoderModel(config)


def chatglm(tokenizer: Any, hidden: int, *, seed: int) -> Any:
    """Kolors' ChatGLM3 encoder in miniature, with weights initialised explicitly:
    the class skips initialisation, and uninitialised weights give NaN images."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    config = ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=-(-tokenizer.vocab_size // 64) * 64,
        hidden_size=hidden,
        ffn_hidden_size=hidden * 2,
        kv_channels=hidden // 4,
        num_attention_heads=4,
        seq_length=1024,
        multi_query_attention=True,
        multi_query_group_num=2,
        add_qkv_bias=True,
        original_rope=True,
        torch_dtype="float32",
    )
    with seeded(seed, "chatglm"):
        model = ChatGLMModel(config, empty_init=False)
        _init_chatglm(model)
    return model


@torch.no_grad()
def _init_chatglm(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if type(module).__name__ in ("RMSNorm", "LayerNorm"):
            torch.nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def sd_unet(sample_size: int, cross_attention_dim: int, *, seed: int, **extra: Any) -> Any:
    """A two-level UNet2DConditionModel (latent sizes must be even); `extra` adds
    the SD 2 / SDXL / Kolors options (linear projections, text_time embeddings...)."""
    from diffusers import UNet2DConditionModel

    options: dict[str, Any] = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    options.update(extra)
    with seeded(seed, "unet"):
        return UNet2DConditionModel(**options)


def sdxl_unet_options(pooled_dim: int, time_ids: int) -> dict[str, Any]:
    """SDXL's conditioning: pooled text plus `time_ids` micro-conditions (6 for the
    base, 5 for the refiner's aesthetic score), 8 dimensions each. Narrower than
    the SD UNet so that two transformer layers on the lower level stay small."""
    return dict(
        block_out_channels=(32, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + pooled_dim,
    )


def deepfloyd_unet(sample_size: int, text_dim: int, *, stage: int, seed: int) -> Any:
    """DeepFloyd IF's pixel-space UNet (learned variance: out_channels 6).
    Stage II takes the upscaled low-resolution image as 3 extra input channels
    and the noise level of that image as a class embedding."""
    from diffusers import UNet2DConditionModel

    options: dict[str, Any] = dict(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=text_dim,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    )
    if stage == 2:
        options.update(
            in_channels=6,
            layers_per_block=(1, 2),
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            time_embedding_dim=32,
        )
    with seeded(seed, "unet"):
        return UNet2DConditionModel(**options)
