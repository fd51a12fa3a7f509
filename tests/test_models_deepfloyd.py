"""DeepFloyd IF stage I and stage II on their tiny real diffusers models.

Covers model_type -> stage and adapter, pixel space without a VAE, text outputs against
IFPipeline.encode_prompt, the learned-range split, stage II's noise-augmented low-resolution
conditioning, LoRA and full training, sampling, clear errors, and loss parity with plain
steps written against diffusers' classes: stage I as diffusers' IF DreamBooth script does
it, stage II with the conditioning IFSuperResolutionPipeline builds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simpletuner.config.schema import TrainingConfig, trains_adapter
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.deepfloyd import DeepFloydFamily, downsample, stage_from_model_type
from simpletuner.models.registry import get_family
from simpletuner.testing.tiny import input_image
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["A Red Cat on a MAT ", "", "an astronaut riding a horse, oil painting"]
STAGES = {1: ("deepfloyd_if", 32), 2: ("deepfloyd_if_stage2", 64)}  # tiny model, its sample size


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in ("deepfloyd_if", "deepfloyd_if_stage2", "sd1x")}


def config(path: Path | str, **options) -> TrainingConfig:
    return TrainingConfig(model_family="deepfloyd", pretrained_model_name_or_path=str(path), **options)


@pytest.fixture(scope="module")
def stages(tiny) -> dict[int, tuple]:
    """Stage -> (family, components, cfg), both loaded in fp32 with a plain model_type."""
    family = get_family("deepfloyd")
    loaded = {}
    for stage, (kind, _) in STAGES.items():
        cfg = config(tiny[kind], model_type="full")
        loaded[stage] = (family, family.load(cfg, FP32), cfg)
    return loaded


def pixels(size: int, batch: int = 3, seed: int = 21) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- model types and declarations
MODEL_TYPES = {  # model_type: (stage, trains an adapter)
    "full": (None, False), "lora": (None, True), "deepfloyd-full": (1, False), "deepfloyd-lora": (1, True),
    "deepfloyd-stage2": (2, False), "deepfloyd-stage2-lora": (2, True),
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_type_names_the_stage_and_what_trains(model_type):
    stage, adapter = MODEL_TYPES[model_type]
    cfg = config("x", model_type=model_type)
    assert stage_from_model_type(model_type) == stage
    assert trains_adapter(cfg) is adapter
    if stage is not None:
        assert get_family("deepfloyd").default_resolution(cfg) == (256 if stage == 2 else 64)
    assert DTypePolicy.for_training(cfg).denoiser == (torch.bfloat16 if adapter else torch.float32)


def test_deepfloyd_model_types_need_the_deepfloyd_family(tmp_path):
    from simpletuner.config.load import load_config
    from simpletuner.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "sdxl", "model_type": "deepfloyd-stage2-lora",
                                "pretrained_model_name_or_path": "x"}))
    with pytest.raises(ConfigError, match="'deepfloyd-stage2-lora' trains DeepFloyd IF and needs model_family "
                                          "'deepfloyd'; for model_family 'sdxl' use 'full' or 'lora'"):
        load_config(path)


def test_default_resolution_of_a_plain_model_type_is_the_models_stage(tiny):
    family = get_family("deepfloyd")
    assert family.default_resolution(config(tiny["deepfloyd_if"], model_type="lora")) == 64
    assert family.default_resolution(config(tiny["deepfloyd_if_stage2"], model_type="full")) == 256


def test_declarations():
    family = get_family("deepfloyd")
    assert isinstance(family, DeepFloydFamily)
    assert (family.alignment, family.native_resolution, family.default_prediction_type) == (8, 64, "epsilon")
    assert family.latent_channels == 3 and family.text_max_length == 77
    family.check_resolution(64, 48)
    with pytest.raises(UserError, match="multiples of 8"):
        family.check_resolution(64, 50)


def test_stage_comes_from_the_model_and_must_match_model_type(stages, tiny):
    assert stages[1][1].settings["stage"] == 1 and stages[2][1].settings["stage"] == 2
    assert stages[2][1].get("vae") is None and stages[2][1]["image_noising_scheduler"] is not None
    family = get_family("deepfloyd")
    with pytest.raises(UserError, match=r"'deepfloyd-lora' trains DeepFloyd stage 1.*IFSuperResolutionPipeline.*"
                                        r"deepfloyd-stage2-lora"):
        family.load(config(tiny["deepfloyd_if_stage2"], model_type="deepfloyd-lora"), FP32)
    with pytest.raises(UserError, match=r"'deepfloyd-stage2' trains DeepFloyd stage 2.*a IFPipeline"):
        family.load(config(tiny["deepfloyd_if"], model_type="deepfloyd-stage2"), FP32)


def test_stage2_without_its_noising_scheduler_is_reported(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["deepfloyd_if_stage2"], tmp_path / "if2"))
    index = json.loads((folder / "model_index.json").read_text())
    index["image_noising_scheduler"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lacks image_noising_scheduler, which DeepFloyd stage II needs"):
        get_family("deepfloyd").load(config(folder), FP32)


def test_wrong_family_is_named(tiny):
    with pytest.raises(UserError, match=r"StableDiffusionPipeline.*'deepfloyd'"):
        get_family("deepfloyd").load(config(tiny["sd1x"]), FP32)
    with pytest.raises(UserError, match=r"IFPipeline \(deepfloyd\).*'pixart_sigma'"):
        get_family("pixart_sigma").load(TrainingConfig(model_family="pixart_sigma",
                                                       pretrained_model_name_or_path=str(tiny["deepfloyd_if"])), FP32)


def test_adapter_targets_name_real_unet_modules(stages):
    family, components, cfg = stages[2]
    names = [name for name, _ in components["unet"].named_modules()]
    targets = family.adapter_targets(cfg)
    assert {"add_k_proj", "add_v_proj", "to_q"} <= set(targets)
    for target in targets:
        assert any(name.endswith("." + target) for name in names), target
    with pytest.raises(UserError, match="'attention\\+ffs' is not available for model_family 'deepfloyd'"):
        family.adapter_targets(cfg.model_copy(update={"unet_lora_target": "attention+ffs"}))


# ---------------------------------------------------------------- pixels and text
def test_pixel_space_without_a_vae(stages):
    family, components, _ = stages[1]
    images = pixels(32)
    mean, std = family.encode_images(components, images)
    assert torch.equal(mean, images) and not std.any()
    drawn = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, images)
    assert family.vae_scale_factor(components) == 1
    assert torch.equal(family.unscale_latents(components, family.scale_latents(components, images)), images)


@pytest.mark.parametrize("stage", [1, 2])
def test_text_outputs_match_encode_prompt(stages, stage):
    family, components, _ = stages[stage]
    ours = family.text_outputs(components, CAPTIONS)
    with torch.no_grad():
        embeds, _ = family.pipeline(components).encode_prompt(CAPTIONS, do_classifier_free_guidance=False,
                                                              device="cpu", clean_caption=False)
    assert set(ours) == {"prompt_embeds"} and ours["prompt_embeds"].shape[:2] == (3, 77)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)


# ---------------------------------------------------------------- stage II conditioning
def test_stage2_conditioning_draws_levels_and_noise_per_sample(stages):
    family, components, _ = stages[2]
    batch = {"latents": pixels(16, batch=64), "text": {}}
    first = family.draw_conditioning(components, batch, torch.Generator().manual_seed(5))
    again = family.draw_conditioning(components, batch, torch.Generator().manual_seed(5))
    levels = first["noise_level"]
    assert levels.shape == (64,) and levels.min() >= 0 and levels.max() <= 250 and levels.unique().numel() > 10
    assert torch.equal(levels, again["noise_level"])
    assert torch.equal(first["low_res_conditioning"], again["low_res_conditioning"])
    assert first["low_res_conditioning"].shape == batch["latents"].shape
    assert family.draw_conditioning(stages[1][1], batch) == batch  # stage I adds nothing

    quiet = dict(components.settings, max_noise_level=0)
    clean = family.draw_conditioning(type(components)(**{**components.__dict__, "settings": quiet}), batch)
    upscaled = F.interpolate(downsample(batch["latents"]), (16, 16), mode="bilinear", align_corners=True)
    assert not clean["noise_level"].any()
    alpha_bar = components["image_noising_scheduler"].alphas_cumprod[0]
    assert (clean["low_res_conditioning"] - alpha_bar.sqrt() * upscaled).abs().max() < 0.1  # barely noised


def test_stage2_needs_its_conditioning(stages):
    family, components, _ = stages[2]
    latents = pixels(64, batch=1)
    with pytest.raises(UserError, match="draw_conditioning"):
        family.predict(components, latents, torch.tensor([3]), family.text_outputs(components, ["x"]),
                       {"latents": latents})


def test_low_res_sides_must_divide_by_four():
    with pytest.raises(UserError, match="multiples of 4.*got 42x40"):
        downsample(torch.zeros(1, 3, 40, 42))


# ---------------------------------------------------------------- parity with plain diffusers steps
def _fixed_draw(images: torch.Tensor) -> NoiseDraw:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(11))
    return NoiseDraw(noise=noise, timesteps=torch.tensor([17, 999, 500]))


@pytest.mark.parametrize("options", [{}, {"snr_gamma": 5.0}])
def test_stage1_loss_parity_with_the_dreambooth_step(stages, options):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    family, components, cfg = stages[1]
    cfg = cfg.model_copy(update=options)
    images = pixels(32)
    draw = _fixed_draw(images)
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        batch = {"latents": family.latents_from_distribution(components, mean, std),
                 "text": family.text_outputs(components, CAPTIONS)}
        batch = family.draw_conditioning(components, batch, torch.Generator().manual_seed(0))
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)

        # diffusers' examples/dreambooth/train_dreambooth.py for IF: pixels are the model input
        embeds, _ = family.pipeline(components).encode_prompt(CAPTIONS, do_classifier_free_guidance=False,
                                                              device="cpu", clean_caption=False)
        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        noisy = noise_scheduler.add_noise(images, draw.noise, draw.timesteps)
        model_pred = components["unet"](noisy, draw.timesteps, embeds, class_labels=None, return_dict=False)[0]
        assert model_pred.shape[1] == 6
        model_pred, _ = torch.chunk(model_pred, 2, dim=1)
        loss = F.mse_loss(model_pred.float(), draw.noise.float(), reduction="none").mean(dim=[1, 2, 3])
        if cfg.snr_gamma:
            snr = compute_snr(noise_scheduler, draw.timesteps)
            loss = loss * torch.stack([snr, cfg.snr_gamma * torch.ones_like(draw.timesteps)], dim=1).min(dim=1)[0] / snr
        reference = loss.mean()
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_stage2_loss_parity_with_the_super_resolution_conditioning(stages):
    from diffusers import DDPMScheduler

    family, components, cfg = stages[2]
    images = pixels(64)
    draw = _fixed_draw(images)
    with torch.no_grad():
        batch = {"latents": images, "text": family.text_outputs(components, CAPTIONS)}
        batch = family.draw_conditioning(components, batch, torch.Generator().manual_seed(7))
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)

        # the same draws, in the same order: a level per sample, then noise of the image's shape
        generator = torch.Generator().manual_seed(7)
        noise_level = torch.randint(0, 251, (3,), generator=generator)
        augmentation = torch.randn(images.shape, generator=generator)
        # IFSuperResolutionPipeline's conditioning of a 16 px image, at training resolution
        pipe = family.pipeline(components)
        low_res = F.avg_pool2d(images, 4)
        upscaled = F.interpolate(low_res, (64, 64), mode="bilinear", align_corners=True)
        upscaled = pipe.image_noising_scheduler.add_noise(upscaled, augmentation, timesteps=noise_level)
        embeds, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        noisy = noise_scheduler.add_noise(images, draw.noise, draw.timesteps)
        model_input = torch.cat([noisy, upscaled], dim=1)
        model_pred = components["unet"](model_input, draw.timesteps, encoder_hidden_states=embeds,
                                        class_labels=noise_level, return_dict=False)[0]
        model_pred, _ = model_pred.chunk(2, dim=1)
        reference = F.mse_loss(model_pred.float(), draw.noise.float(), reduction="mean")
    assert torch.equal(batch["noise_level"], noise_level)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- what trains
@pytest.mark.parametrize(("model_type", "kind"), [("deepfloyd-lora", "lora"), ("deepfloyd-stage2", "full")])
def test_lora_and_full_training_get_gradients(tiny, model_type, kind):
    from simpletuner.train.adapters import prepare_trainable

    stage = stage_from_model_type(model_type)
    family = get_family("deepfloyd")
    cfg = config(tiny[STAGES[stage][0]], model_type=model_type, lora_rank=2)
    components = family.load(cfg, FP32)
    trained = prepare_trainable(family.denoiser(components), cfg, family.adapter_targets(cfg),
                                prefix=family.denoiser_name())
    assert trained.kind == kind
    images = pixels(STAGES[stage][1], batch=2)
    batch = family.draw_conditioning(components, {"latents": images, "text": family.text_outputs(components,
                                                                                                   CAPTIONS[:2])})
    draw = NoiseDraw(noise=torch.randn(images.shape, generator=torch.Generator().manual_seed(1)),
                     timesteps=torch.tensor([10, 900]))
    training_loss(family, components, family.objective(cfg, components), batch, draw).backward()
    parameters = trained.parameters()
    assert parameters and any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    names = [name for name, p in components["unet"].named_parameters() if p.requires_grad]
    assert all("lora" in name for name in names) == (kind == "lora")


# ---------------------------------------------------------------- pipelines
def test_stage1_pipeline_samples_two_steps(stages):
    family, components, cfg = stages[1]
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "IFPipeline" and pipe.scheduler.config.variance_type == "learned_range"
    run = cfg.model_copy(update={"validation_num_inference_steps": 2})
    images = family.sample_images(pipe, run, "a cat", 32, 32, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(32, 32)]


def test_stage2_pipeline_upscales_a_training_image(stages):
    family, components, cfg = stages[2]
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "IFSuperResolutionPipeline"
    run = cfg.model_copy(update={"validation_num_inference_steps": 2})
    images = family.sample_images(pipe, run, "a cat", 64, 64, torch.Generator().manual_seed(0), input_image(64))
    assert [image.size for image in images] == [(64, 64)]
    with pytest.raises(UserError, match="stage II validation needs an input image"):
        family.sample_images(pipe, run, "a cat", 64, 64, torch.Generator().manual_seed(0))
