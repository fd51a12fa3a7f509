"""Kwai Kolors on its tiny real diffusers model (SDXL UNet, ChatGLM text encoder).

Covers declarations, text outputs against KolorsPipeline.encode_prompt, SDXL's time ids and
caption dropout under Kolors' settings, sampling, wrong-family errors, and loss parity with
a plain step written the way diffusers' SDXL training script computes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.kolors import KolorsFamily
from simpletuner.models.registry import get_family
from simpletuner.models.sdxl import SDXLFamily
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["a red cat on a mat", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in ("kolors", "sdxl")}


def config(path: Path | str, family: str = "kolors", **options) -> TrainingConfig:
    return TrainingConfig(model_family=family, pretrained_model_name_or_path=str(path), **options)


@pytest.fixture(scope="module")
def loaded(tiny):
    cfg = config(tiny["kolors"])
    family = get_family("kolors")
    return family, family.load(cfg, FP32), cfg


def encode_prompt(family, components, captions=CAPTIONS):
    with torch.no_grad():
        embeds, _, pooled, _ = family.pipeline(components).encode_prompt(
            captions, device="cpu", do_classifier_free_guidance=False, max_sequence_length=128)
    return embeds, pooled


def sizes(latents: torch.Tensor, text: dict) -> dict:
    count = latents.shape[0]
    return {"latents": latents, "text": text, "original_size": torch.tensor([[40.0, 48.0]]).expand(count, 2),
            "crop_top_left": torch.tensor([[4.0, 8.0]]).expand(count, 2),
            "target_size": torch.tensor([[32.0, 32.0]]).expand(count, 2)}


def test_declarations_and_sdxl_lineage(loaded):
    family, components, _ = loaded
    assert isinstance(family, KolorsFamily) and isinstance(family, SDXLFamily)
    assert (family.alignment, family.native_resolution, family.default_prediction_type) == (64, 1024, "epsilon")
    assert family.text_max_length == 256
    assert components.settings["text_max_length"] == 128  # the tiny tokenizer's limit
    assert components.settings["force_zeros_for_empty_prompt"] is False and not components.settings["is_refiner"]
    assert components.noise_scheduler.config.num_train_timesteps == 1100
    assert type(components["text_encoder"]).__name__ == "ChatGLMModel"
    names = [name for name, _ in components["unet"].named_modules()]
    for target in family.adapter_targets(config("x", unet_lora_target="attention+ffs")):
        assert any(name.endswith("." + target) for name in names), target


def test_text_outputs_match_encode_prompt(loaded):
    family, components, _ = loaded
    ours = family.text_outputs(components, CAPTIONS)
    embeds, pooled = encode_prompt(family, components)
    assert ours["prompt_embeds"].shape == (3, 128, components["text_encoder"].config.hidden_size)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


def test_text_length_follows_the_config(tiny):
    family = get_family("kolors")
    components = family.load(config(tiny["kolors"], tokenizer_max_length=32), FP32)
    assert family.text_outputs(components, CAPTIONS[:1])["prompt_embeds"].shape[1] == 32
    assert family.text_cache_settings(config("x", tokenizer_max_length=32)) != family.text_cache_settings(config("x"))


def test_caption_dropout_uses_the_empty_caption_and_zeroes_size_conditioning(loaded):
    family, components, _ = loaded
    text = family.text_outputs(components, CAPTIONS[:2])
    empty = family.text_outputs(components, [""])
    latents = torch.zeros(2, 4, 8, 8)
    dropped, batch = family.drop_captions(components, text, empty, torch.tensor([True, False]), sizes(latents, text))
    torch.testing.assert_close(dropped["prompt_embeds"][1], empty["prompt_embeds"][0])  # not zeros: Kolors' default
    torch.testing.assert_close(dropped["pooled_prompt_embeds"][1], empty["pooled_prompt_embeds"][0])
    ids = family.time_ids(components, latents, batch)
    assert ids[0].tolist() == [40, 48, 4, 8, 32, 32] and not ids[1].any()


def test_loss_parity_with_a_plain_diffusers_step(loaded):
    from diffusers import DDPMScheduler

    family, components, cfg = loaded
    images = torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(21)) * 2 - 1
    mean, std = family.encode_images(components, images)
    latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    draw = NoiseDraw(noise=noise, timesteps=torch.tensor([17, 1099, 550]))  # Kolors trains on 1100 steps
    with torch.no_grad():
        ours = training_loss(family, components, family.objective(cfg, components),
                             sizes(latents, family.text_outputs(components, CAPTIONS)), draw)

        # diffusers' train_text_to_image_sdxl.py step, with KolorsPipeline's text encoding
        vae = components["vae"]
        ref_latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(4))
        ref_latents = ref_latents * vae.config.scaling_factor
        embeds, pooled = encode_prompt(family, components)
        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        noisy = noise_scheduler.add_noise(ref_latents, noise, draw.timesteps)
        time_ids = torch.tensor([[40.0, 48.0, 4.0, 8.0, 32.0, 32.0]] * 3)
        model_pred = components["unet"](noisy, draw.timesteps, embeds, return_dict=False,
                                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
        reference = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_pipeline_samples_two_steps(loaded):
    family, components, cfg = loaded
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "KolorsPipeline"
    run = cfg.model_copy(update={"validation_num_inference_steps": 2})
    images = family.sample_images(pipe, run, "a cat", 32, 32, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(32, 32)]


def test_wrong_family_is_named(tiny):
    with pytest.raises(UserError, match=r"StableDiffusionXLPipeline \(sdxl\).*'kolors'"):
        get_family("kolors").load(config(tiny["sdxl"]), FP32)
    with pytest.raises(UserError, match=r"KolorsPipeline \(kolors\).*'sdxl'"):
        get_family("sdxl").load(config(tiny["kolors"], "sdxl"), FP32)
