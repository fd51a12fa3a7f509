"""PixArt Sigma on its tiny real diffusers model.

Covers declarations, text outputs against PixArtSigmaPipeline.encode_prompt (T5 with
attention mask), the learned-sigma split, resolution/aspect conditioning for checkpoints
that use it, caption dropout, sampling, wrong-family errors, and loss parity with a plain
step written against diffusers' classes the way PixArt training scripts compute it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.pixart import PixArtSigmaFamily
from simpletuner.models.registry import get_family
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["A Red Cat on a mat  ", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in ("pixart_sigma", "kolors")}


def config(path: Path | str, **options) -> TrainingConfig:
    return TrainingConfig(model_family="pixart_sigma", pretrained_model_name_or_path=str(path), **options)


@pytest.fixture(scope="module")
def loaded(tiny):
    cfg = config(tiny["pixart_sigma"])
    family = get_family("pixart_sigma")
    return family, family.load(cfg, FP32), cfg


def pixels(batch: int = 3, size: int = 32, seed: int = 21) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_declarations():
    family = get_family("pixart_sigma")
    assert isinstance(family, PixArtSigmaFamily)
    assert (family.alignment, family.native_resolution, family.default_prediction_type) == (16, 1024, "epsilon")
    assert family.text_max_length == 300 and family.latent_channels == 4
    assert family.denoiser_name() == "transformer"
    family.check_resolution(1024, 768)
    with pytest.raises(UserError, match="multiples of 16"):
        family.check_resolution(1032, 768)


def test_load_gives_the_transformer_and_the_clipped_text_length(loaded, tiny):
    family, components, _ = loaded
    assert family.denoiser(components) is components["transformer"]
    assert components["transformer"].config.out_channels == 2 * components["transformer"].config.in_channels
    # 300 by default, but the tiny tokenizer stops at 128; tokenizer_max_length overrides both
    assert components.settings["text_max_length"] == components["tokenizer"].model_max_length == 128
    shorter = family.load(config(tiny["pixart_sigma"], tokenizer_max_length=40), FP32)
    assert family.text_outputs(shorter, CAPTIONS)["prompt_embeds"].shape[1] == 40
    assert family.text_cache_settings(config("x", tokenizer_max_length=40)) != family.text_cache_settings(config("x"))


def test_text_outputs_match_encode_prompt(loaded):
    family, components, _ = loaded
    ours = family.text_outputs(components, CAPTIONS)
    with torch.no_grad():  # as the pipeline runs it (T5's attention takes another kernel under autograd)
        embeds, mask, _, _ = family.pipeline(components).encode_prompt(
            CAPTIONS, do_classifier_free_guidance=False, device="cpu", max_sequence_length=128)
    assert set(ours) == {"prompt_embeds", "prompt_attention_mask"}
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    assert torch.equal(ours["prompt_attention_mask"], mask)
    assert mask[1].sum() == 1 and mask[0].sum() > 1  # the empty caption is its end token alone


def test_adapter_targets_name_transformer_modules(loaded):
    family, components, cfg = loaded
    names = [name for name, _ in components["transformer"].named_modules()]
    for preset in ("attention", "attention+ffs"):
        targets = family.adapter_targets(cfg.model_copy(update={"unet_lora_target": preset}))
        for target in targets:
            assert any(name.endswith("." + target) for name in names), target


def test_caption_dropout_takes_the_empty_captions_embeddings_and_mask(loaded):
    family, components, _ = loaded
    text = family.text_outputs(components, CAPTIONS)
    empty = family.text_outputs(components, [""])
    dropped, _ = family.drop_captions(components, text, empty, torch.tensor([True, True, False]), {})
    assert torch.equal(dropped["prompt_attention_mask"][2], empty["prompt_attention_mask"][0])
    torch.testing.assert_close(dropped["prompt_embeds"][2], empty["prompt_embeds"][0])
    assert torch.equal(dropped["prompt_embeds"][0], text["prompt_embeds"][0])


# ---------------------------------------------------------------- parity with a plain diffusers step
def _reference_loss(components, transformer, latents, noise, timesteps, embeds, mask, added) -> torch.Tensor:
    """PixArt's training step against diffusers' classes: add_noise, transformer, noise half, MSE."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                             added_cond_kwargs=added).sample.chunk(2, 1)[0]
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def _our_loss(family, components, cfg, images, batch_extra=None) -> torch.Tensor:
    mean, std = family.encode_images(components, images)
    latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
    batch = {"latents": latents, "text": family.text_outputs(components, CAPTIONS), **(batch_extra or {})}
    draw = NoiseDraw(noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(11)),
                     timesteps=torch.tensor([17, 999, 500]))
    return training_loss(family, components, family.objective(cfg, components), batch, draw), draw


def _reference_inputs(components, images):
    vae = components["vae"]
    latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(4)) * vae.config.scaling_factor
    embeds, mask, _, _ = PixArtSigmaFamily().pipeline(components).encode_prompt(
        CAPTIONS, do_classifier_free_guidance=False, device="cpu", max_sequence_length=128)
    return latents, embeds, mask


def test_loss_parity_with_a_plain_diffusers_step(loaded):
    family, components, cfg = loaded
    images = pixels()
    with torch.no_grad():
        ours, draw = _our_loss(family, components, cfg, images)
        latents, embeds, mask = _reference_inputs(components, images)
        reference = _reference_loss(components, components["transformer"], latents, draw.noise, draw.timesteps,
                                    embeds, mask, {"resolution": None, "aspect_ratio": None})
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def conditioned(loaded):
    """The tiny model with a transformer that takes resolution and aspect-ratio conditioning (as PixArt-alpha)."""
    from diffusers import PixArtTransformer2DModel

    family, components, cfg = loaded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        # (its width must divide by 3: two thirds resolution, one third aspect ratio)
        transformer = PixArtTransformer2DModel.from_config(components["transformer"].config, num_attention_heads=3,
                                                           cross_attention_dim=48, use_additional_conditions=True)
    modules = dict(components.modules, transformer=transformer)
    return type(components)(modules=modules, noise_scheduler=components.noise_scheduler, source=components.source,
                            pipeline_class=components.pipeline_class, settings=components.settings)


def test_resolution_and_aspect_conditioning_where_the_checkpoint_uses_it(loaded, conditioned):
    family, _, cfg = loaded
    images = pixels()
    sizes = {"original_size": torch.tensor([[600.0, 800.0]] * 3), "target_size": torch.tensor([[24.0, 32.0]] * 3)}
    with torch.no_grad():
        ours, draw = _our_loss(family, conditioned, cfg, images, sizes)
        latents, embeds, mask = _reference_inputs(conditioned, images)
        # as PixArt trained: the original size, and the trained size's height / width
        added = {"resolution": torch.tensor([[600.0, 800.0]] * 3), "aspect_ratio": torch.tensor([[0.75]] * 3)}
        reference = _reference_loss(conditioned, conditioned["transformer"], latents, draw.noise, draw.timesteps,
                                    embeds, mask, added)
        other = _reference_loss(conditioned, conditioned["transformer"], latents, draw.noise, draw.timesteps,
                                embeds, mask, {"resolution": torch.tensor([[32.0, 32.0]] * 3),
                                               "aspect_ratio": torch.tensor([[1.0]] * 3)})
        without_sizes, _ = _our_loss(family, conditioned, cfg, images)  # falls back to the latents' size
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(without_sizes, other, rtol=0, atol=1e-5)
    assert abs(ours - other) > 1e-6  # the conditioning reaches the model


def test_sample_conditioning_is_height_width():
    from simpletuner.data.records import ImagePlan

    plan = ImagePlan(original_size=(1200, 800), resized_size=(1536, 1024), crop_box=(256, 0, 1280, 1024),
                     target_size=(1024, 1024))
    conditioning = get_family("pixart_sigma").sample_conditioning(plan)
    assert conditioning["original_size"].tolist() == [800, 1200]
    assert conditioning["target_size"].tolist() == [1024, 1024]


def test_lora_on_the_transformer_trains_and_exports_in_peft_format(tiny, tmp_path):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from simpletuner.train.adapters import prepare_trainable

    family = get_family("pixart_sigma")
    cfg = config(tiny["pixart_sigma"], model_type="lora", lora_rank=2)
    components = family.load(cfg, FP32)
    trained = prepare_trainable(family.denoiser(components), cfg, family.adapter_targets(cfg),
                                prefix=family.denoiser_name())
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"latents": latents, "text": family.text_outputs(components, CAPTIONS[:2])}
    draw = NoiseDraw(noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)),
                     timesteps=torch.tensor([5, 900]))
    training_loss(family, components, family.objective(cfg, components), batch, draw).backward()
    assert trained.kind == "lora" and trained.parameters()
    assert all("lora" in name for name, p in components["transformer"].named_parameters() if p.requires_grad)
    assert sum(p.grad.abs().sum() for p in trained.parameters()) > 0

    with torch.no_grad():  # a trained-looking adapter (lora_B starts at zero)
        for parameter in trained.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    from simpletuner.publish.lora_files import write_peft_lora
    from simpletuner.train.adapters import TrainedLora

    lora = TrainedLora.from_models(components.pipeline_class, {"transformer": trained.model})
    written = write_peft_lora(tmp_path / "lora", lora)
    assert written.name == "adapter_model.safetensors" and (tmp_path / "lora" / "adapter_config.json").is_file()
    base = PixArtTransformer2DModel.from_pretrained(tiny["pixart_sigma"], subfolder="transformer")
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora")
    inputs = dict(encoder_hidden_states=batch["text"]["prompt_embeds"],
                  encoder_attention_mask=batch["text"]["prompt_attention_mask"], timestep=draw.timesteps,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        ours = trained.model(latents, **inputs)[0]
        theirs = loaded(latents, **inputs)[0]
        plain = PixArtTransformer2DModel.from_pretrained(tiny["pixart_sigma"], subfolder="transformer")(
            latents, **inputs)[0]
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(plain, ours)


# ---------------------------------------------------------------- pipelines and errors
def test_pipeline_samples_two_steps_at_a_tiny_size(loaded):
    family, components, cfg = loaded
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    run = cfg.model_copy(update={"validation_num_inference_steps": 2, "num_validation_images": 1})
    images = family.sample_images(pipe, run, "a cat", 32, 16, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(32, 16)]  # exactly the asked size: no resolution binning
    assert pipe.scheduler.config.timestep_spacing == cfg.inference_scheduler_timestep_spacing
    assert type(pipe).__name__ == "PixArtSigmaPipeline"


def test_wrong_family_is_named(tiny):
    with pytest.raises(UserError, match=r"KolorsPipeline \(kolors\).*'pixart_sigma'"):
        get_family("pixart_sigma").load(config(tiny["kolors"]), FP32)
    with pytest.raises(UserError, match=r"PixArtSigmaPipeline \(pixart_sigma\).*'kolors'"):
        get_family("kolors").load(TrainingConfig(model_family="kolors",
                                                 pretrained_model_name_or_path=str(tiny["pixart_sigma"])), FP32)
