"""SD3 family on the tiny real SD3 pipeline: loading, text, latents, caption dropout, adapters,
pipeline, and loss parity with a plain step written as diffusers' train_dreambooth_lora_sd3.py does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.registry import get_family
from simpletuner.models.sd3 import SD3Family
from simpletuner.testing.tiny import sample_kwargs
from simpletuner.models.flow import FlowMatchingObjective
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["a red cat on a mat", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in ("sd3", "flux")}


def config(path: Path | str, **options) -> TrainingConfig:
    return TrainingConfig(model_family="sd3", pretrained_model_name_or_path=str(path), **options)


def load(path: Path | str, **options):
    cfg = config(path, **options)
    family = get_family("sd3")
    return family, family.load(cfg, FP32), cfg


def pixels(batch: int = 3, size: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def encode_prompt(pipe, captions, length):
    with torch.no_grad():  # as the pipeline's __call__ runs it
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                  max_sequence_length=length)
    return embeds, pooled


# ---------------------------------------------------------------- declarations and loading
def test_sd3_declares_its_facts():
    family = get_family("sd3")
    assert isinstance(family, SD3Family)
    assert (family.alignment, family.native_resolution, family.latent_channels) == (16, 1024, 16)
    assert family.default_prediction_type == "flow_matching" and family.text_max_length == 154
    assert family.denoiser_name() == "transformer"
    family.check_resolution(1024, 528)
    with pytest.raises(UserError, match="multiples of 16"):
        family.check_resolution(1024, 520)


def test_load_reads_the_flow_scheduler_and_settings(tiny):
    family, components, cfg = load(tiny["sd3"], t5_padding="zero", sd3_clip_uncond_behaviour="zero")
    assert components.pipeline_class == "StableDiffusion3Pipeline"
    assert type(components.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    settings = components.settings
    assert settings["prediction_type"] == "flow_matching" and settings["t5_padding"] == "zero"
    assert settings["clip_uncond"] == settings["t5_uncond"] == "zero"  # T5 follows CLIP unless set
    # the default 154 tokens are clipped to the tiny T5 tokenizer's 128
    assert settings["t5_max_length"] == min(154, components["tokenizer_3"].model_max_length)
    assert family.denoiser(components) is components["transformer"]
    objective = family.objective(cfg, components)
    assert isinstance(objective, FlowMatchingObjective) and objective.shift == cfg.flow_schedule_shift


def test_ddpm_validation_schedulers_are_ignored_with_a_warning(tiny, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        family, components, _ = load(tiny["sd3"], validation_noise_scheduler="euler")
    assert any("validation_noise_scheduler=euler is ignored" in r.getMessage() for r in caplog.records)
    assert type(family.pipeline(components).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_text_cache_settings_name_every_text_option():
    family = get_family("sd3")
    plain = family.text_cache_settings(config("x"))
    assert plain != family.text_cache_settings(config("x", t5_padding="zero"))
    assert plain != family.text_cache_settings(config("x", tokenizer_max_length=77))


def test_wrong_family_and_prediction_type_are_refused(tiny):
    with pytest.raises(UserError, match="FluxPipeline.*'sd3'"):
        load(tiny["flux"])
    with pytest.raises(UserError, match="StableDiffusion3Pipeline.*'flux'"):
        get_family("flux").load(TrainingConfig(model_family="flux", pretrained_model_name_or_path=str(tiny["sd3"])),
                                FP32)
    with pytest.raises(UserError, match="prediction_type='epsilon'.*flow matching"):
        load(tiny["sd3"], prediction_type="epsilon")


def test_separate_transformer_replaces_the_models(tiny, tmp_path):
    from diffusers import SD3Transformer2DModel

    other = SD3Transformer2DModel.from_pretrained(tiny["sd3"], subfolder="transformer")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.25)
    other.save_pretrained(tmp_path / "transformer")
    _, components, _ = load(tiny["sd3"], pretrained_transformer_model_name_or_path=str(tmp_path))
    for got, want in zip(components["transformer"].state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(got, want)


def test_a_shared_t5_replaces_the_models(tiny, tmp_path):
    from transformers import T5EncoderModel

    other = T5EncoderModel.from_pretrained(tiny["sd3"], subfolder="text_encoder_3")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1)
    other.save_pretrained(tmp_path / "pixart_like" / "text_encoder")  # another family's layout
    other.save_pretrained(tmp_path / "flat")
    for location in (tmp_path / "pixart_like", tmp_path / "flat"):
        family, components, cfg = load(tiny["sd3"], pretrained_t5_model_name_or_path=str(location))
        for got, want in zip(components["text_encoder_3"].state_dict().values(), other.state_dict().values()):
            torch.testing.assert_close(got, want)
    # a different T5 gives different embeddings: it keys the text cache
    assert family.text_cache_settings(cfg) != family.text_cache_settings(config(tiny["sd3"]))


# ---------------------------------------------------------------- text
@pytest.mark.parametrize("length", [None, 24])
def test_text_outputs_equal_encode_prompt(tiny, length):
    family, components, _ = load(tiny["sd3"], tokenizer_max_length=length)
    ours = family.text_outputs(components, CAPTIONS)
    t5_length = components.settings["t5_max_length"]
    assert t5_length == (length or 128)
    embeds, pooled = encode_prompt(family.pipeline(components), CAPTIONS, t5_length)
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert ours["prompt_embeds"].shape == (3, 77 + t5_length, components["transformer"].config.joint_attention_dim)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


def test_t5_zero_padding_zeroes_only_padding_positions(tiny):
    family, components, _ = load(tiny["sd3"], t5_padding="zero", tokenizer_max_length=32)
    zeroed = family.text_outputs(components, CAPTIONS)["prompt_embeds"]
    _, plain_components, _ = load(tiny["sd3"], tokenizer_max_length=32)
    plain = family.text_outputs(plain_components, CAPTIONS)["prompt_embeds"]
    mask = components["tokenizer_3"](CAPTIONS, padding="max_length", max_length=32, truncation=True,
                                     return_tensors="pt").attention_mask.bool()
    t5_zeroed, t5_plain = zeroed[:, 77:], plain[:, 77:]
    assert not t5_zeroed[~mask].any() and t5_plain[~mask].abs().sum() > 0
    torch.testing.assert_close(t5_zeroed[mask], t5_plain[mask], rtol=0, atol=0)
    torch.testing.assert_close(zeroed[:, :77], plain[:, :77], rtol=0, atol=0)


def test_without_t5_the_t5_part_is_zeros_as_in_the_pipeline(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["sd3"], tmp_path / "sd3"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    family, components, _ = load(folder, tokenizer_max_length=16)
    assert components.get("text_encoder_3") is None
    ours = family.text_outputs(components, CAPTIONS)
    embeds, _ = encode_prompt(family.pipeline(components), CAPTIONS, 16)
    assert not ours["prompt_embeds"][:, 77:].any()
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)


@pytest.mark.parametrize(("clip", "t5"), [("empty_string", None), ("zero", None), ("empty_string", "zero"),
                                          ("zero", "empty_string")])
def test_caption_dropout_follows_the_uncond_behaviours(tiny, clip, t5):
    family, components, _ = load(tiny["sd3"], tokenizer_max_length=16, sd3_clip_uncond_behaviour=clip,
                                 sd3_t5_uncond_behaviour=t5)
    text = family.text_outputs(components, CAPTIONS[:2])
    empty = family.text_outputs(components, [""])
    dropped, _ = family.drop_captions(components, text, empty, torch.tensor([True, False]), {})
    torch.testing.assert_close(dropped["prompt_embeds"][0], text["prompt_embeds"][0])
    clip_part, t5_part = dropped["prompt_embeds"][1, :77], dropped["prompt_embeds"][1, 77:]
    if clip == "zero":
        assert not clip_part.any() and not dropped["pooled_prompt_embeds"][1].any()
    else:
        torch.testing.assert_close(clip_part, empty["prompt_embeds"][0, :77])
        torch.testing.assert_close(dropped["pooled_prompt_embeds"][1], empty["pooled_prompt_embeds"][0])
    if (t5 or clip) == "zero":
        assert not t5_part.any()
    else:
        torch.testing.assert_close(t5_part, empty["prompt_embeds"][0, 77:])
    assert empty["prompt_embeds"].abs().sum() > 0  # the cached empty caption is left untouched


# ---------------------------------------------------------------- latents
def test_latents_use_the_vae_shift_and_scale(tiny):
    family, components, _ = load(tiny["sd3"])
    vae, images = components["vae"], pixels(2)
    mean, std = family.encode_images(components, images)
    assert mean.shape[1] == 16
    drawn = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(3))
    with torch.no_grad():
        sample = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert vae.config.shift_factor
    torch.testing.assert_close(drawn, (sample - vae.config.shift_factor) * vae.config.scaling_factor)
    torch.testing.assert_close(family.unscale_latents(components, drawn), sample)


# ---------------------------------------------------------------- adapters and pipeline
def test_adapter_presets_and_lycoris_targets_name_real_modules(tiny):
    from simpletuner.train.adapters import apply_lycoris

    family, components, cfg = load(tiny["sd3"])
    transformer = components["transformer"]
    names = [name for name, _ in transformer.named_modules()]
    for preset in ("attention", "attention+ffs"):
        targets = family.adapter_targets(cfg.model_copy(update={"unet_lora_target": preset}))
        for target in targets:
            assert any(name.endswith("." + target) for name in names), (preset, target)
    assert family.adapter_targets(cfg) == ["to_k", "to_q", "to_v", "to_out.0"]
    classes = {type(module).__name__ for module in transformer.modules()}
    assert set(family.lycoris_targets) <= classes
    network = apply_lycoris(transformer, {"algo": "lokr", "factor": 4}, targets=family.lycoris_targets)
    assert sum(p.numel() for p in network.parameters()) > 0


def test_pipeline_samples_two_steps_with_the_models_scheduler(tiny):
    family, components, cfg = load(tiny["sd3"])
    pipe = family.pipeline(components)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.scheduler.config.shift == components["scheduler"].config.shift
    images = pipe(**sample_kwargs("sd3"), output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)
    validation = cfg.model_copy(update={"validation_num_inference_steps": 2, "validation_guidance": 3.0})
    sampled = family.sample_images(pipe, validation, "a cat", 32, 32, torch.Generator().manual_seed(0))
    assert len(sampled) == 1 and sampled[0].size == (32, 32)


def test_lora_export_loads_into_the_sd3_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from simpletuner.publish.lora_files import save_lora_weights
    from simpletuner.train.adapters import apply_lora

    family, components, cfg = load(tiny["sd3"])
    transformer = apply_lora(components["transformer"], rank=4, target_modules=family.adapter_targets(cfg))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path = save_lora_weights(tmp_path, "StableDiffusion3Pipeline", {"transformer": transformer})
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    text = family.text_outputs(components, ["a cat"])
    args = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text["prompt_embeds"],
                pooled_projections=text["pooled_prompt_embeds"], return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**args)[0], transformer(**args)[0], rtol=0, atol=1e-5)
    images = pipe(**sample_kwargs("sd3"), output_type="np").images
    assert images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- parity with a plain diffusers step
def _reference_loss(components, images, captions, noise, sigmas, weighting, t5_length):
    """train_dreambooth_lora_sd3.py's step, written against diffusers' classes."""
    from diffusers import StableDiffusion3Pipeline

    vae, transformer = components["vae"], components["transformer"]
    model_input = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(4))
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=components["scheduler"], vae=vae,
                                    text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                                    text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
                                    text_encoder_3=components["text_encoder_3"], tokenizer_3=components["tokenizer_3"])
    prompt_embeds, pooled_prompt_embeds = encode_prompt(pipe, captions, t5_length)
    timesteps = sigmas * 1000
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                             encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
                             return_dict=False)[0]
    loss_weights = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((loss_weights.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                      1)
    return loss.mean()


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_parity_with_a_plain_diffusers_step(tiny, weighting):
    family, components, cfg = load(tiny["sd3"], flow_loss_weighting=weighting, tokenizer_max_length=32)
    images = pixels(seed=21)
    sigmas = torch.tensor([0.3, 0.5, 0.93])  # sigma_sqrt weights stay small enough for an absolute 1e-5
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
        batch = {"latents": latents, "text": family.text_outputs(components, CAPTIONS)}
        draw = NoiseDraw(noise=noise, timesteps=sigmas * 1000)
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)
        reference = _reference_loss(components, images, CAPTIONS, noise, sigmas, weighting, 32)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- end to end through the CLI
@pytest.mark.slow
def test_full_fine_tune_run_writes_an_sd3_pipeline_folder(tmp_path, tiny):
    from diffusers import DiffusionPipeline
    from train_helpers import metrics, write_run

    from simpletuner.cli import main

    config = write_run(tmp_path, tiny["sd3"], "sd3", model_type="full", learning_rate=1e-4, tokenizer_max_length=32,
                       t5_padding="zero", flow_loss_weighting="cosmap")
    assert main(["train", str(config)]) == 0
    losses = metrics(tmp_path / "output")
    assert sorted(losses) == [1, 2, 3, 4] and all(loss == loss for loss in losses.values())
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "output" / "pipeline")
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline"
    original = DiffusionPipeline.from_pretrained(tiny["sd3"])
    trained = dict(pipeline.transformer.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in original.transformer.named_parameters())
    images = pipeline(**sample_kwargs("sd3"), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and (images == images).all()


def test_half_precision_frozen_transformer_takes_fp32_inputs(tiny):
    family = get_family("sd3")
    cfg = config(tiny["sd3"], tokenizer_max_length=16)
    components = family.load(cfg, DTypePolicy(denoiser=torch.bfloat16))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    text = family.text_outputs(components, CAPTIONS[:2])
    draw = NoiseDraw(noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)),
                     timesteps=torch.tensor([250.0, 750.0]))
    with torch.no_grad():
        loss = training_loss(family, components, family.objective(cfg, components),
                             {"latents": latents, "text": text}, draw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------- skip-layer guidance in validation
def _validate(tmp_path, family, components, cfg):
    import numpy as np
    from PIL import Image

    from simpletuner.validate import run_validation, validation_plan

    seen: list = []
    hook = components["transformer"].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("skip_layers")), with_kwargs=True)
    try:
        files = run_validation(validation_plan(cfg, family), family, components, cfg, step=0)
    finally:
        hook.remove()
    return np.asarray(Image.open(files[0]), dtype=np.int16), seen


def test_skip_layer_guidance_reaches_the_transformer_and_changes_the_image(tiny, tmp_path):
    options = dict(validation_prompt="a red cat", validation_resolution="32", validation_num_inference_steps=10,
                   validation_guidance=4.0, tokenizer_max_length=32)
    family, components, plain = load(tiny["sd3"], output_dir=str(tmp_path / "plain"), **options)
    slg = plain.model_copy(update={"output_dir": str(tmp_path / "slg"), "validation_guidance_skip_layers": [1],
                                   "validation_guidance_skip_scale": 8.0})
    without, calls_without = _validate(tmp_path, family, components, plain)
    with_slg, calls_with = _validate(tmp_path, family, components, slg)
    assert set(calls_without) == {None}
    # 10 steps, start 0.01, stop 0.2: the pipeline adds a prediction without block 1 at step 1 only
    assert calls_with.count([1]) == 1 and len(calls_with) == 11
    assert np.abs(with_slg - without).max() > 0


def test_skip_layer_guidance_inputs_follow_the_options(tiny):
    from simpletuner.models.sd3 import skip_layer_guidance

    cfg = config(tiny["sd3"])
    assert skip_layer_guidance(cfg) == {}
    cfg = config(tiny["sd3"], validation_guidance_skip_layers="[7, 8, 9]", validation_guidance_skip_layers_start=0.0,
                 validation_guidance_skip_layers_stop=1.0)
    assert skip_layer_guidance(cfg) == {"skip_guidance_layers": [7, 8, 9], "skip_layer_guidance_start": 0.0,
                                        "skip_layer_guidance_stop": 1.0, "skip_layer_guidance_scale": 2.8}


def test_skip_layers_outside_the_transformer_and_an_empty_window_are_refused(tiny):
    from pydantic import ValidationError

    with pytest.raises(UserError, match=r"validation_guidance_skip_layers=\[1, 2\]: layer\(s\) \[2\] do not exist"):
        load(tiny["sd3"], validation_guidance_skip_layers=[1, 2])
    with pytest.raises(ValidationError, match="layer indices count from 0"):
        config(tiny["sd3"], validation_guidance_skip_layers=[-1])
    with pytest.raises(ValidationError, match="validation_guidance_skip_layers_start"):
        config(tiny["sd3"], validation_guidance_skip_layers=[1], validation_guidance_skip_layers_start=0.5,
               validation_guidance_skip_layers_stop=0.2)


def test_other_families_ignore_skip_layer_guidance_with_a_warning(tiny, caplog):
    from simpletuner.validate import validation_plan

    cfg = TrainingConfig(model_family="flux", pretrained_model_name_or_path=str(tiny["flux"]),
                         validation_prompt="a cat", validation_guidance_skip_layers=[1])
    with caplog.at_level("WARNING"):
        assert validation_plan(cfg, get_family("flux")) is not None
    assert "validation_guidance_skip_layers is ignored for model_family 'flux'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        validation_plan(config(tiny["sd3"], validation_prompt="a cat", validation_guidance_skip_layers=[1]),
                        get_family("sd3"))
    assert "ignored" not in caplog.text
