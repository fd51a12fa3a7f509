"""SD 1.x/2.x and SDXL (base, refiner) families on tiny real diffusers models.

Covers loading (local folders, per-component dtypes, VAE override, clear errors),
text outputs against the pipelines' own encode_prompt, latents, conditioning,
caption dropout, adapter targets, pipelines, and loss parity with a plain
diffusers training step written the way diffusers' example scripts do it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simpletuner.config.schema import TrainingConfig
from simpletuner.data.records import ImagePlan
from simpletuner.errors import ConfigError, UserError
from simpletuner.models.base import DTypePolicy, read_model_index
from simpletuner.models.registry import family_names, get_family
from simpletuner.models.sd import SD1Family, SD2Family, StableDiffusionFamily
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["a red cat on a mat", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    """The shared tiny pipelines (simpletuner.testing.tiny) of the families under test."""
    return {kind: tiny_model(kind) for kind in ("sd1x", "sd2x", "sdxl", "sdxl_refiner")}


def config(path: Path | str, family: str, **options) -> TrainingConfig:
    return TrainingConfig(model_family=family, pretrained_model_name_or_path=str(path), **options)


def load(tiny, kind: str, family: str | None = None, **options):
    family_name = family or ("sdxl" if kind == "sdxl_refiner" else kind)
    cfg = config(tiny[kind], family_name, **options)
    family = get_family(family_name)
    return family, family.load(cfg, FP32), cfg


def latent_size(family, components, size: int = 32) -> tuple[int, int]:
    side = size // family.vae_scale_factor(components)
    return side, side


def pixels(batch: int = 2, size: int = 32, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, size, size), generator=generator) * 2 - 1


# ---------------------------------------------------------------- registry and declarations
def test_registry_resolves_every_family_name_and_legacy():
    assert {"legacy", "sd1x", "sd2x", "sdxl", "sdxl_refiner"} <= set(family_names())
    assert type(get_family("legacy")) is StableDiffusionFamily
    assert isinstance(get_family("sd1x"), SD1Family) and isinstance(get_family("sd2x"), SD2Family)
    assert get_family("sdxl") is not get_family("sdxl")  # fresh instances, no singletons


def test_unknown_family_names_the_choices():
    with pytest.raises(ConfigError, match="'sdxxl'.*legacy.*sdxl"):
        get_family("sdxxl")


def test_families_declare_alignment_resolution_prediction_and_text_length():
    sd1, sd2, xl = get_family("sd1x"), get_family("sd2x"), get_family("sdxl")
    assert (sd1.native_resolution, sd2.native_resolution, xl.native_resolution) == (512, 768, 1024)
    assert (sd1.default_prediction_type, sd2.default_prediction_type) == ("epsilon", "v_prediction")
    assert sd1.alignment == 8 and xl.alignment == 64
    assert sd1.latent_channels == xl.latent_channels == 4 and xl.text_max_length == 77
    xl.check_resolution(1024, 768)
    with pytest.raises(UserError, match="1000x768.*multiples of 64"):
        xl.check_resolution(1000, 768)


def test_adapter_presets_name_real_unet_modules(tiny):
    family, components, cfg = load(tiny, "sdxl")
    names = [name for name, _ in components["unet"].named_modules()]
    attention = family.adapter_targets(cfg)
    assert attention == ["to_k", "to_q", "to_v", "to_out.0"]
    with_ff = family.adapter_targets(cfg.model_copy(update={"unet_lora_target": "attention+ffs"}))
    assert set(with_ff) > set(attention)
    for target in with_ff:
        assert any(name.endswith("." + target) for name in names), target


# ---------------------------------------------------------------- loading
def test_load_local_folder_with_a_dtype_per_component(tiny):
    family = get_family("sd1x")
    cfg = config(tiny["sd1x"], "sd1x")
    policy = DTypePolicy(denoiser=torch.bfloat16, vae=torch.float32, text_encoders=torch.float16)
    components = family.load(cfg, policy)
    assert components["unet"].dtype == torch.bfloat16
    assert components["vae"].dtype == torch.float32
    assert components["text_encoder"].dtype == torch.float16
    assert components.pipeline_class == "StableDiffusionPipeline"
    assert family.denoiser(components) is components["unet"]
    assert components.settings["prediction_type"] == "epsilon"


def test_training_dtype_policy_follows_the_config():
    lora = DTypePolicy.for_training(config("x", "sdxl", model_type="lora", vae_dtype="default"))
    assert lora == DTypePolicy(denoiser=torch.bfloat16, vae=torch.float32, text_encoders=torch.bfloat16)
    full = DTypePolicy.for_training(config("x", "sdxl", model_type="full", base_model_default_dtype="fp32",
                                           vae_dtype="fp16"))
    assert full == DTypePolicy(denoiser=torch.float32, vae=torch.float16, text_encoders=torch.float32)


def test_prediction_type_comes_from_the_model_unless_overridden(tiny):
    _, components, _ = load(tiny, "sd2x")
    assert components.settings["prediction_type"] == "v_prediction"
    _, components, _ = load(tiny, "sd2x", prediction_type="epsilon")
    assert components.settings["prediction_type"] == "epsilon"


def test_separate_vae_replaces_the_models_vae(tiny, tmp_path):
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(tiny["sd1x"], subfolder="vae")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.5)
    other.save_pretrained(tmp_path / "flat_vae")
    second = _copy(tiny["sd1x"], tmp_path)  # a whole model folder: its vae subfolder is taken
    other.save_pretrained(second / "vae")
    for location in (tmp_path / "flat_vae", second):
        _, components, _ = load(tiny, "sd1x", pretrained_vae_model_name_or_path=str(location))
        for got, want in zip(components["vae"].state_dict().values(), other.state_dict().values()):
            torch.testing.assert_close(got, want)


def test_wrong_family_is_named(tiny):
    with pytest.raises(UserError) as error:
        get_family("sdxl").load(config(tiny["sd1x"], "sdxl"), FP32)
    message = str(error.value)
    assert str(tiny["sd1x"]) in message and "StableDiffusionPipeline" in message and "'sdxl'" in message
    assert "sd1x" in message  # what it would take
    with pytest.raises(UserError, match="StableDiffusionXLPipeline.*'sd1x'"):
        get_family("sd1x").load(config(tiny["sdxl"], "sd1x"), FP32)


def test_sdxl_family_serves_base_and_refiner(tiny):
    from simpletuner.models.sdxl import SDXLFamily

    assert type(get_family("sdxl")) is SDXLFamily and isinstance(get_family("sdxl_refiner"), SDXLFamily)


def test_refiner_by_name_rejects_a_base_model(tiny):
    with pytest.raises(UserError, match="not an SDXL refiner"):
        get_family("sdxl_refiner").load(config(tiny["sdxl"], "sdxl"), FP32)
    components = get_family("sdxl_refiner").load(config(tiny["sdxl_refiner"], "sdxl"), FP32)
    assert components.settings["is_refiner"] and components.get("text_encoder") is None


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_missing_component_is_named(tiny, tmp_path):
    folder = _copy(tiny["sdxl"], tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"lacks text_encoder_2, which model_family 'sdxl' needs \(model_index"):
        get_family("sdxl").load(config(folder, "sdxl"), FP32)
    index["text_encoder_2"], index["text_encoder"] = index["text_encoder"], [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lacks text_encoder, which an SDXL base model needs"):
        get_family("sdxl").load(config(folder, "sdxl"), FP32)


def test_missing_component_folder_is_reported(tiny, tmp_path):
    folder = _copy(tiny["sd1x"], tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(UserError, match="declares vae but the folder has no vae subfolder"):
        get_family("sd1x").load(config(folder, "sd1x"), FP32)


def test_folder_without_model_index_and_absent_paths(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        read_model_index(str(tmp_path))
    with pytest.raises(UserError, match="no such folder"):
        read_model_index(str(tmp_path / "nowhere" / "model"))


def test_hub_id_offline_and_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="simpletuner-tests/absent-model.*offline"):
        read_model_index("simpletuner-tests/absent-model")


# ---------------------------------------------------------------- text
def test_sd_text_outputs_match_encode_prompt(tiny):
    for kind in ("sd1x", "sd2x"):
        family, components, _ = load(tiny, kind)
        ours = family.text_outputs(components, CAPTIONS)
        theirs, _ = family.pipeline(components).encode_prompt(CAPTIONS, "cpu", 1, False)
        assert set(ours) == {"prompt_embeds"}
        torch.testing.assert_close(ours["prompt_embeds"], theirs, rtol=0, atol=0)


def test_sdxl_text_outputs_match_encode_prompt(tiny):
    for kind in ("sdxl", "sdxl_refiner"):
        family, components, _ = load(tiny, kind)
        ours = family.text_outputs(components, CAPTIONS)
        embeds, _, pooled, _ = family.pipeline(components).encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
        widths = [components[name].config.hidden_size for name in ("text_encoder", "text_encoder_2")
                  if components.get(name) is not None]
        assert ours["prompt_embeds"].shape == (3, 77, sum(widths))
        torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


# ---------------------------------------------------------------- latents and conditioning
def test_latent_distribution_and_scaled_draw_match_the_vae(tiny):
    family, components, _ = load(tiny, "sd1x")
    vae, images = components["vae"], pixels()
    mean, std = family.encode_images(components, images)
    with torch.no_grad():
        distribution = vae.encode(images).latent_dist
    torch.testing.assert_close(mean, distribution.mean)
    torch.testing.assert_close(std, distribution.std)
    drawn = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(3))
    expected = distribution.sample(generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    torch.testing.assert_close(drawn, expected)
    torch.testing.assert_close(family.unscale_latents(components, drawn), expected / vae.config.scaling_factor)
    assert mean.shape == (2, 4, *[32 // family.vae_scale_factor(components)] * 2)


def test_sample_conditioning_from_a_plan_uses_sdxl_order():
    plan = ImagePlan(original_size=(1200, 800), resized_size=(1536, 1024), crop_box=(256, 0, 1280, 1024),
                     target_size=(1024, 1024))
    conditioning = get_family("sdxl").sample_conditioning(plan)
    assert conditioning["original_size"].tolist() == [800, 1200]
    assert conditioning["crop_top_left"].tolist() == [0, 256]
    assert conditioning["target_size"].tolist() == [1024, 1024]
    assert get_family("sd1x").sample_conditioning(plan) == {}


def sdxl_batch(latents: torch.Tensor, text: dict) -> dict:
    batch = latents.shape[0]
    return {
        "latents": latents, "text": text,
        "original_size": torch.tensor([[40.0, 48.0]]).expand(batch, 2),
        "crop_top_left": torch.tensor([[4.0, 8.0]]).expand(batch, 2),
        "target_size": torch.tensor([[32.0, 32.0]]).expand(batch, 2),
    }


def test_time_ids_and_the_refiner_variant(tiny):
    family, components, _ = load(tiny, "sdxl")
    latents = torch.zeros(2, 4, *latent_size(family, components))
    batch = sdxl_batch(latents, {})
    assert family.time_ids(components, latents, batch).tolist() == [[40, 48, 4, 8, 32, 32]] * 2
    del batch["target_size"]  # falls back to the latents' size in pixels
    assert family.time_ids(components, latents, batch).tolist() == [[40, 48, 4, 8, 32, 32]] * 2
    family, refiner, _ = load(tiny, "sdxl_refiner", data_aesthetic_score=6.0)
    assert family.time_ids(refiner, latents, batch).tolist() == [[40, 48, 4, 8, 6.0]] * 2
    batch["aesthetic_score"] = torch.tensor([2.5, 3.0])
    assert family.time_ids(refiner, latents, batch)[:, 4].tolist() == [2.5, 3.0]


def test_sdxl_caption_dropout_zeroes_text_and_size_conditioning(tiny):
    family, components, _ = load(tiny, "sdxl")
    text = family.text_outputs(components, CAPTIONS[:2])
    empty = family.text_outputs(components, [""])
    latents = torch.randn(2, 4, *latent_size(family, components), generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([True, False])
    dropped_text, dropped_batch = family.drop_captions(components, text, empty, keep, sdxl_batch(latents, text))
    assert torch.equal(dropped_text["prompt_embeds"][0], text["prompt_embeds"][0])
    assert not dropped_text["prompt_embeds"][1].any() and not dropped_text["pooled_prompt_embeds"][1].any()
    ids = family.time_ids(components, latents, dropped_batch)
    assert ids[0].tolist() == [40, 48, 4, 8, 32, 32] and not ids[1].any()

    kept_size = components.settings | {"drop_size_conditioning": False, "force_zeros_for_empty_prompt": False}
    components.settings = kept_size
    dropped_text, dropped_batch = family.drop_captions(components, text, empty, keep, sdxl_batch(latents, text))
    torch.testing.assert_close(dropped_text["prompt_embeds"][1], empty["prompt_embeds"][0])
    assert family.time_ids(components, latents, dropped_batch)[1].tolist() == [40, 48, 4, 8, 32, 32]


def test_sd_caption_dropout_uses_the_empty_caption(tiny):
    family, components, _ = load(tiny, "sd1x")
    text = family.text_outputs(components, CAPTIONS[:3])
    empty = family.text_outputs(components, [""])
    dropped, _ = family.drop_captions(components, text, empty, torch.tensor([False, True, False]), {})
    torch.testing.assert_close(dropped["prompt_embeds"][0], empty["prompt_embeds"][0])
    torch.testing.assert_close(dropped["prompt_embeds"][1], text["prompt_embeds"][1])


# ---------------------------------------------------------------- objective and pipelines
def test_objective_follows_the_model_schedule_and_options(tiny):
    from diffusers import DDPMScheduler

    family, components, cfg = load(tiny, "sd2x", rescale_betas_zero_snr=True, refiner_training=True,
                                   refiner_training_strength=0.25)
    objective = family.objective(cfg, components)
    reference = DDPMScheduler.from_config(components["scheduler"].config, rescale_betas_zero_snr=True)
    torch.testing.assert_close(objective.alphas_cumprod, reference.alphas_cumprod)
    assert objective.prediction_type == "v_prediction" and objective.alphas_cumprod[-1] == 0
    assert objective.timestep_weights[250:].sum() == 0 and objective.timestep_weights[:250].sum() > 0.999


def test_pipelines_sample_with_the_run_scheduler(tiny):
    for kind in ("sd1x", "sdxl"):
        family, components, _ = load(tiny, kind, inference_scheduler_timestep_spacing="leading")
        pipe = family.pipeline(components)
        assert pipe.scheduler.config.timestep_spacing == "leading"
        image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 32, 32, 3)
    family, components, _ = load(tiny, "sdxl_refiner")
    pipe = family.pipeline(components)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    image = pipe("a cat", image=(pixels(1) + 1) / 2, num_inference_steps=2, strength=0.5, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_v_prediction_pipeline_scheduler_gets_zero_snr(tiny):
    family, components, _ = load(tiny, "sd2x", rescale_betas_zero_snr=True)
    scheduler = family.pipeline(components).scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr


# ---------------------------------------------------------------- parity with a plain diffusers step
def _reference_loss(components, cfg: TrainingConfig, prediction_type: str, latents, noise, timesteps,
                    encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
    """The step of diffusers' train_text_to_image(_sdxl).py, written against diffusers' classes."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config, prediction_type=prediction_type,
                                                rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = components["unet"](noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                    return_dict=False)[0]
    if cfg.snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, cfg.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def _fixed_draw(latents: torch.Tensor) -> NoiseDraw:
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    return NoiseDraw(noise=noise, timesteps=torch.tensor([17, 999, 500])[: latents.shape[0]])


PARITY_CASES = [
    ("sd1x", {}),
    ("sd1x", {"snr_gamma": 5.0}),
    ("sd2x", {"rescale_betas_zero_snr": True, "snr_gamma": 5.0}),
    ("sd2x", {}),
    ("sdxl", {}),
    ("sdxl", {"snr_gamma": 5.0}),
    ("sdxl_refiner", {}),
]


@pytest.mark.parametrize(("kind", "options"), PARITY_CASES)
def test_loss_parity_with_a_plain_diffusers_step(tiny, kind, options):
    family, components, cfg = load(tiny, kind, **options)
    images = pixels(batch=3, seed=21)
    mean, std = family.encode_images(components, images)
    latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
    text = family.text_outputs(components, CAPTIONS)
    batch = sdxl_batch(latents, text) if kind.startswith("sdxl") else {"latents": latents, "text": text}
    draw = _fixed_draw(latents)
    with torch.no_grad():
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)

        # the reference draws its own latents and builds its own conditioning
        ref_latents = components["vae"].encode(images).latent_dist.sample(torch.Generator().manual_seed(4))
        ref_latents = ref_latents * components["vae"].config.scaling_factor
        pipe = family.pipeline(components)
        added = None
        if kind == "sd1x" or kind == "sd2x":
            ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            hidden = components["text_encoder"](ids, return_dict=False)[0]
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
            tail = [cfg.data_aesthetic_score] if kind == "sdxl_refiner" else [32.0, 32.0]
            time_ids = torch.tensor([[40.0, 48.0, 4.0, 8.0] + tail] * 3)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        prediction_type = "v_prediction" if kind == "sd2x" else "epsilon"
        reference = _reference_loss(components, cfg, prediction_type, ref_latents, draw.noise, draw.timesteps,
                                    hidden, added)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_half_precision_frozen_base_takes_fp32_inputs(tiny):
    family = get_family("sdxl")
    cfg = config(tiny["sdxl"], "sdxl")
    components = family.load(cfg, DTypePolicy(denoiser=torch.bfloat16))
    latents = torch.randn(2, 4, *latent_size(family, components), generator=torch.Generator().manual_seed(0))
    text = family.text_outputs(components, CAPTIONS[:2])
    with torch.no_grad():
        loss = training_loss(family, components, family.objective(cfg, components), sdxl_batch(latents, text),
                             _fixed_draw(latents))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
