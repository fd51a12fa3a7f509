"""Tiny random diffusers pipelines for every model family, built locally in seconds.

    from simpletuner.testing import tiny
    path = tiny.build("sdxl", Path("models/sdxl"))        # a complete diffusers folder
    pipe = DiffusionPipeline.from_pretrained(path)
    images = pipe(**tiny.sample_kwargs("sdxl")).images    # 2 steps at 32x32

Each pipeline uses the family's real classes (UNet2DConditionModel, SD3/Flux/PixArt/Hunyuan-DiT
transformers, AutoencoderKL, CLIP, T5, ChatGLM, BERT), locally trained tokenizers and the
family's real scheduler type, at 1-6 MB. A build is atomic (written under a
temporary name and renamed) and reused when its marker file matches the family,
the seed and the recipe (a hash of these modules and the library versions).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.testing.tiny_tokenizers import (
    BERT_MAX_LENGTH, CHATGLM_MAX_LENGTH, CLIP_MAX_LENGTH, MT5_MAX_LENGTH, T5_MAX_LENGTH, TokenizerKit,
)

logger = get_logger(__name__)

MARKER = "tiny-model.json"

# Model constructors draw from torch's global RNG (seeded and restored per component):
# builds in threads of one process must take turns to stay deterministic.
_RNG_TURN = threading.Lock()

# Widths of the text encoders (hidden sizes), different on purpose. SD3 pads its
# two CLIPs' concatenated states (32 + 48) up to the T5 width (96), as the real one does.
CLIP_L, CLIP_G, CLIP_SD3_G, T5_DIM, CHATGLM_DIM, BERT_DIM = 32, 64, 48, 96, 64, 40


@dataclass(frozen=True)
class TinySpec:
    """What a tiny family looks like, for tests and for the code that trains it."""

    family: str
    pipeline_class: str
    objective: str  # "epsilon", "v_prediction" or "flow_matching"
    text_max_lengths: dict[str, int]  # tokenizer attribute -> model_max_length
    sample_size: int = 32  # pixels, square: the default size, sampled in tests
    latent_channels: int = 4  # 3 for the pixel-space DeepFloyd stages
    vae_scale_factor: int = 4  # 1 in pixel space
    input_image_size: int | None = None  # pixels of the img2img / super-resolution input


_CLIP = {"tokenizer": CLIP_MAX_LENGTH}
_CLIP2 = {"tokenizer": CLIP_MAX_LENGTH, "tokenizer_2": CLIP_MAX_LENGTH}
_T5 = {"tokenizer": T5_MAX_LENGTH}
_PIXELS = dict(latent_channels=3, vae_scale_factor=1)

SPECS: dict[str, TinySpec] = {
    spec.family: spec
    for spec in (
        TinySpec("sd1x", "StableDiffusionPipeline", "epsilon", _CLIP),
        TinySpec("sd2x", "StableDiffusionPipeline", "v_prediction", _CLIP),
        TinySpec("sdxl", "StableDiffusionXLPipeline", "epsilon", _CLIP2),
        TinySpec("sdxl_refiner", "StableDiffusionXLImg2ImgPipeline", "epsilon", {"tokenizer_2": CLIP_MAX_LENGTH},
                 input_image_size=32),
        TinySpec("sd3", "StableDiffusion3Pipeline", "flow_matching", {**_CLIP2, "tokenizer_3": T5_MAX_LENGTH},
                 latent_channels=16),
        TinySpec("flux", "FluxPipeline", "flow_matching", {**_CLIP, "tokenizer_2": T5_MAX_LENGTH}, latent_channels=16),
        TinySpec("pixart_sigma", "PixArtSigmaPipeline", "epsilon", _T5),
        TinySpec("kolors", "KolorsPipeline", "epsilon", {"tokenizer": CHATGLM_MAX_LENGTH}),
        TinySpec("hunyuan_dit", "HunyuanDiTPipeline", "v_prediction",
                 {"tokenizer": BERT_MAX_LENGTH, "tokenizer_2": MT5_MAX_LENGTH}, vae_scale_factor=8),
        TinySpec("deepfloyd_if", "IFPipeline", "epsilon", _T5, **_PIXELS),
        TinySpec("deepfloyd_if_stage2", "IFSuperResolutionPipeline", "epsilon", _T5, sample_size=64,
                 input_image_size=32, **_PIXELS),
    )
}
FAMILIES: tuple[str, ...] = tuple(SPECS)

# Pipelines whose call takes `max_sequence_length` (their default, 256 to 512, exceeds the tiny T5's).
_LONG_TEXT_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2", "pixart_sigma": "tokenizer", "kolors": "tokenizer"}


def build(family: str, directory: Path, seed: int = 0, *, tokenizers: TokenizerKit | None = None) -> Path:
    """Write the tiny `family` pipeline to `directory` (unless a matching build is there).

    Safe to call from several processes at once: the build happens under a
    temporary name and is renamed into place under a file lock.
    """
    from filelock import FileLock

    spec = _require_family(family)
    directory = Path(directory)
    if is_complete(directory, family, seed):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        if is_complete(directory, family, seed):
            return directory
        _refuse_foreign(directory)
        partial = directory.parent / f".{directory.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write(spec, partial, seed, tokenizers or TokenizerKit())
            _replace(partial, directory)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("built tiny %s pipeline in %s", family, directory)
    return directory


def build_all(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Every family into `directory/<family>`, training each tokenizer once."""
    kit = TokenizerKit()
    return {family: build(family, Path(directory) / family, seed, tokenizers=kit) for family in FAMILIES}


def is_complete(directory: Path, family: str, seed: int = 0) -> bool:
    """True when `directory` holds a finished build of `family` with this seed and recipe."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("family") == family and marker.get("seed") == seed and marker.get("recipe") == recipe()


def sample_kwargs(family: str, prompt: str = "a red fox in the snow, photo") -> dict[str, Any]:
    """Arguments for the family's pipeline call: 2 steps at its smallest size."""
    spec = _require_family(family)
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": 2,
        "height": spec.sample_size,
        "width": spec.sample_size,
    }
    if family in _LONG_TEXT_TOKENIZER:
        kwargs["max_sequence_length"] = spec.text_max_lengths[_LONG_TEXT_TOKENIZER[family]]
    if family in ("pixart_sigma", "hunyuan_dit"):
        kwargs["use_resolution_binning"] = False  # bins start at 256 px (PixArt), 768 px (Hunyuan-DiT)
    if family.startswith(("pixart", "deepfloyd")):
        kwargs["clean_caption"] = False  # needs bs4 and ftfy, which are not dependencies
    if spec.input_image_size:
        kwargs["image"] = input_image(spec.input_image_size)
    if family == "sdxl_refiner":
        kwargs["strength"] = 1.0  # all 2 steps run (strength < 1 would skip some)
    if family == "deepfloyd_if_stage2":
        del kwargs["height"], kwargs["width"]  # it samples at unet.config.sample_size
    return kwargs


def input_image(size: int) -> Any:
    """A deterministic RGB gradient, the input of img2img and super-resolution samples."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    r, g = np.meshgrid(ramp, ramp)
    pixels = np.stack([r, g, 255 - r], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@cache
def recipe() -> str:
    """A hash of everything that shapes a build: these modules' source and the library versions."""
    import diffusers
    import torch
    import transformers

    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("tiny.py", "tiny_parts.py", "tiny_tokenizers.py"):
        digest.update((here / name).read_bytes())
    digest.update(f"{torch.__version__} {diffusers.__version__} {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def _require_family(family: str) -> TinySpec:
    if family in SPECS:
        return SPECS[family]
    close = difflib.get_close_matches(family, FAMILIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"Unknown tiny model family {family!r}; choose one of: {', '.join(FAMILIES)}.{hint}")


def _write(spec: TinySpec, path: Path, seed: int, kit: TokenizerKit) -> None:
    from transformers.utils import logging as transformers_logging

    with _RNG_TURN:
        pipeline = _ASSEMBLERS[spec.family](kit, seed)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar per encoder
    try:
        pipeline.save_pretrained(path)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    marker = {"family": spec.family, "seed": seed, "recipe": recipe(), **asdict(spec)}
    (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: the build is complete


def _refuse_foreign(directory: Path) -> None:
    """Only an empty directory or an outdated tiny build may be replaced: anything else is not ours."""
    if directory.exists() and not (directory / MARKER).is_file() and any(directory.iterdir()):
        raise UserError(
            f"Cannot build a tiny model in {directory}: it exists and holds something other than a "
            f"tiny model build (no {MARKER}). Give a new or empty directory."
        )


def _replace(partial: Path, directory: Path) -> None:
    """Rename `partial` to `directory`, moving aside (then deleting) what `_refuse_foreign` let through."""
    if directory.exists():
        stale = directory.parent / f".{directory.name}.stale-{uuid.uuid4().hex[:8]}"
        directory.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    partial.rename(directory)


# ---- one assembler per family: (tokenizers, seed) -> pipeline ----------------------------


def _sd(kit: TokenizerKit, seed: int, *, v_prediction: bool) -> Any:
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    from simpletuner.testing import tiny_parts as parts

    hidden = CLIP_G if v_prediction else CLIP_L
    extra = {"use_linear_projection": True, "attention_head_dim": (2, 4)} if v_prediction else {}
    common = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1
    )
    if v_prediction:  # as stable-diffusion-2-1
        scheduler = DDIMScheduler(**common, clip_sample=False, prediction_type="v_prediction")
    else:  # as stable-diffusion-v1-5
        scheduler = PNDMScheduler(**common, skip_prk_steps=True)
    return StableDiffusionPipeline(
        vae=parts.vae(4, 32, shift=False, seed=seed),
        text_encoder=parts.clip_text(kit.clip, hidden, projection=False, seed=seed, name="text_encoder"),
        tokenizer=kit.clip,
        unet=parts.sd_unet(8, hidden, seed=seed, **extra),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )


def _sdxl(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import StableDiffusionXLPipeline

    from simpletuner.testing import tiny_parts as parts

    options = parts.sdxl_unet_options(pooled_dim=CLIP_G, time_ids=6)
    return StableDiffusionXLPipeline(
        vae=parts.vae(4, 32, shift=False, seed=seed),
        text_encoder=parts.clip_text(kit.clip, CLIP_L, projection=False, seed=seed, name="text_encoder"),
        text_encoder_2=parts.clip_text(kit.clip, CLIP_G, projection=True, seed=seed, name="text_encoder_2"),
        tokenizer=kit.clip,
        tokenizer_2=kit.clip,
        unet=parts.sd_unet(8, CLIP_L + CLIP_G, seed=seed, **options),
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


def _sdxl_refiner(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from simpletuner.testing import tiny_parts as parts

    options = parts.sdxl_unet_options(pooled_dim=CLIP_G, time_ids=5)
    return StableDiffusionXLImg2ImgPipeline(
        vae=parts.vae(4, 32, shift=False, seed=seed),
        text_encoder=None,
        text_encoder_2=parts.clip_text(kit.clip, CLIP_G, projection=True, seed=seed, name="text_encoder_2"),
        tokenizer=None,
        tokenizer_2=kit.clip,
        unet=parts.sd_unet(8, CLIP_G, seed=seed, **options),
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def _sd3(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from simpletuner.testing import tiny_parts as parts

    with parts.seeded(seed, "transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=64,
            pooled_projection_dim=CLIP_L + CLIP_SD3_G,
            pos_embed_max_size=32,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=parts.vae(16, 32, shift=True, seed=seed),
        text_encoder=parts.clip_text(kit.clip, CLIP_L, projection=True, seed=seed, name="text_encoder"),
        tokenizer=kit.clip,
        text_encoder_2=parts.clip_text(kit.clip, CLIP_SD3_G, projection=True, seed=seed, name="text_encoder_2"),
        tokenizer_2=kit.clip,
        text_encoder_3=parts.t5_encoder(kit.t5, T5_DIM, seed=seed),
        tokenizer_3=kit.t5,
    )


def _flux(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from simpletuner.testing import tiny_parts as parts

    with parts.seeded(seed, "transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_L,
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(4, 6, 6),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(  # as FLUX.1-dev: the shift grows with the image size
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=parts.vae(16, 32, shift=True, seed=seed),
        text_encoder=parts.clip_text(kit.clip, CLIP_L, projection=False, seed=seed, name="text_encoder"),
        tokenizer=kit.clip,
        text_encoder_2=parts.t5_encoder(kit.t5, T5_DIM, seed=seed),
        tokenizer_2=kit.t5,
    )


def _pixart_sigma(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from simpletuner.testing import tiny_parts as parts

    with parts.seeded(seed, "transformer"):
        transformer = PixArtTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=8,  # learned sigma
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            cross_attention_dim=32,
            caption_channels=T5_DIM,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
    return PixArtSigmaPipeline(
        tokenizer=kit.t5,
        text_encoder=parts.t5_encoder(kit.t5, T5_DIM, seed=seed),
        vae=parts.vae(4, 32, shift=False, seed=seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _kolors(kit: TokenizerKit, seed: int) -> Any:
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    from simpletuner.testing import tiny_parts as parts

    options = parts.sdxl_unet_options(pooled_dim=CHATGLM_DIM, time_ids=6)
    options.update(encoder_hid_dim=CHATGLM_DIM, encoder_hid_dim_type="text_proj")  # as Kolors: 4096 -> 2048
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", num_train_timesteps=1100,
        steps_offset=1, timestep_spacing="leading",
    )
    return KolorsPipeline(
        vae=parts.vae(4, 32, shift=False, seed=seed),
        text_encoder=parts.chatglm(kit.chatglm, CHATGLM_DIM, seed=seed),
        tokenizer=kit.chatglm,
        unet=parts.sd_unet(8, 32, seed=seed, **options),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )


def _hunyuan_dit(kit: TokenizerKit, seed: int) -> Any:
    """As HunyuanDiT-v1.1 (image size and style conditioning on; v1.2 turns it off), with a VAE
    that downsamples by 8: the pipeline computes its rotary grid from height // 8."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    from simpletuner.testing import tiny_parts as parts

    with parts.seeded(seed, "transformer"):
        transformer = HunyuanDiT2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            patch_size=2,
            sample_size=4,  # latent side: 32 px
            hidden_size=32,
            num_layers=4,  # 4 blocks: one long skip connection, as the real 40 have 19
            mlp_ratio=2.0,
            learn_sigma=True,
            cross_attention_dim=BERT_DIM,
            cross_attention_dim_t5=T5_DIM,
            pooled_projection_dim=32,
            text_len=BERT_MAX_LENGTH,
            text_len_t5=MT5_MAX_LENGTH,
            use_style_cond_and_image_meta_size=True,
        )
    scheduler = DDPMScheduler(  # as HunyuanDiT-v1.2's scheduler_config.json
        beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear", prediction_type="v_prediction",
        steps_offset=1, timestep_spacing="leading", clip_sample=False, variance_type="fixed_small",
    )
    return HunyuanDiTPipeline(
        vae=parts.vae(4, 32, shift=False, seed=seed, blocks=parts.VAE_BLOCKS_8X),
        text_encoder=parts.bert_text(kit.bert, BERT_DIM, seed=seed),
        tokenizer=kit.bert,
        transformer=transformer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=parts.t5_encoder(kit.mt5, T5_DIM, seed=seed),
        tokenizer_2=kit.mt5,
    )


def _if_scheduler(**extra: Any) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02, **extra)


def _if_denoiser_scheduler() -> Any:
    return _if_scheduler(
        thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, variance_type="learned_range"
    )


def _deepfloyd(kit: TokenizerKit, seed: int, *, stage: int) -> Any:
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from simpletuner.testing import tiny_parts as parts

    size = SPECS["deepfloyd_if_stage2" if stage == 2 else "deepfloyd_if"].sample_size
    components = dict(
        tokenizer=kit.t5,
        text_encoder=parts.t5_encoder(kit.t5, T5_DIM, seed=seed),
        unet=parts.deepfloyd_unet(size, T5_DIM, stage=stage, seed=seed),
        scheduler=_if_denoiser_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    if stage == 1:
        return IFPipeline(**components)
    return IFSuperResolutionPipeline(**components, image_noising_scheduler=_if_scheduler())


_ASSEMBLERS: dict[str, Callable[[TokenizerKit, int], Any]] = {
    "sd1x": lambda kit, seed: _sd(kit, seed, v_prediction=False),
    "sd2x": lambda kit, seed: _sd(kit, seed, v_prediction=True),
    "sdxl": _sdxl,
    "sdxl_refiner": _sdxl_refiner,
    "sd3": _sd3,
    "flux": _flux,
    "pixart_sigma": _pixart_sigma,
    "kolors": _kolors,
    "hunyuan_dit": _hunyuan_dit,
    "deepfloyd_if": lambda kit, seed: _deepfloyd(kit, seed, stage=1),
    "deepfloyd_if_stage2": lambda kit, seed: _deepfloyd(kit, seed, stage=2),
}
