"""Flux family on the tiny real Flux pipeline (dev-like, with guidance embedding) and a schnell-like
copy without it: packing, text, guidance modes, masked training, adapters, pipeline, and loss
parity with a plain step written as diffusers' train_dreambooth_lora_flux.py does."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.flux import (
    FLUX_ADAPTER_PRESETS,
    FluxFamily,
    flux_text_length,
    joint_attention_mask,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from simpletuner.models.registry import get_family
from simpletuner.testing.tiny import sample_kwargs
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["a red cat on a mat", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny Flux pipeline, and a copy whose transformer has no guidance embedding (schnell-like)."""
    dev = tiny_model("flux")
    schnell = Path(shutil.copytree(dev, tmp_path_factory.mktemp("schnell") / "flux-schnell"))
    config = dict(FluxTransformer2DModel.load_config(dev, subfolder="transformer"))
    config["guidance_embeds"] = False
    torch.manual_seed(3)
    transformer = FluxTransformer2DModel.from_config(config)
    shutil.rmtree(schnell / "transformer")
    transformer.save_pretrained(schnell / "transformer")
    return {"dev": dev, "schnell": schnell, "sd3": tiny_model("sd3")}


def config(path: Path | str, **options) -> TrainingConfig:
    return TrainingConfig(model_family="flux", pretrained_model_name_or_path=str(path), **options)


def load(path: Path | str, **options):
    cfg = config(path, **options)
    family = get_family("flux")
    return family, family.load(cfg, FP32), cfg


def pixels(batch: int = 3, size: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def encode_prompt(pipe, captions, length):
    with torch.no_grad():
        return pipe.encode_prompt(captions, captions, max_sequence_length=length)


# ---------------------------------------------------------------- declarations and loading
def test_flux_declares_its_facts():
    family = get_family("flux")
    assert isinstance(family, FluxFamily)
    assert (family.alignment, family.native_resolution, family.latent_channels) == (16, 1024, 16)
    assert family.default_prediction_type == "flow_matching" and family.text_max_length == 512
    assert family.lycoris_targets == ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def test_dev_and_schnell_are_told_apart_by_the_guidance_embedding(tiny):
    _, dev, _ = load(tiny["dev"])
    _, schnell, _ = load(tiny["schnell"])
    assert dev.settings["guidance_embeds"] and not schnell.settings["guidance_embeds"]
    long_tokenizer = copy.copy(dev["tokenizer_2"])
    long_tokenizer.model_max_length = 512
    assert flux_text_length(config("x"), long_tokenizer, has_guidance=True) == 512
    assert flux_text_length(config("x"), long_tokenizer, has_guidance=False) == 256
    assert flux_text_length(config("x", tokenizer_max_length=77), long_tokenizer, has_guidance=True) == 77
    assert dev.settings["t5_max_length"] == 128  # clipped to the tiny tokenizer's model_max_length


def test_schnell_without_the_fast_schedule_is_warned_about(tiny, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        load(tiny["schnell"])
    assert any("flux_fast_schedule" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        _, components, cfg = load(tiny["schnell"], flux_fast_schedule=True)
    assert not any("flux_fast_schedule" in record.getMessage() for record in caplog.records)
    assert get_family("flux").objective(cfg, components).sampling == "schnell"


def test_wrong_family_is_refused(tiny):
    with pytest.raises(UserError, match="StableDiffusion3Pipeline.*'flux'"):
        load(tiny["sd3"])


# ---------------------------------------------------------------- packing
def test_pack_unpack_and_ids_match_the_pipeline():
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (2, 4 * 6, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), latents)
    torch.testing.assert_close(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 64, 96, 8))
    ids = latent_image_ids(8, 12, torch.device("cpu"), torch.float32)
    assert ids.shape == (24, 3) and ids[:, 0].eq(0).all()
    assert ids[7].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of a 4 x 6 grid
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, torch.device("cpu"), torch.float32))


def test_joint_attention_mask_puts_text_first():
    mask = joint_attention_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]), image_tokens=2)
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False, True, True], [True, False, False, True, True]]


# ---------------------------------------------------------------- text
@pytest.mark.parametrize("length", [None, 20])
def test_text_outputs_equal_encode_prompt(tiny, length):
    family, components, _ = load(tiny["dev"], tokenizer_max_length=length)
    ours = family.text_outputs(components, CAPTIONS)
    t5_length = components.settings["t5_max_length"]
    embeds, pooled, text_ids = encode_prompt(family.pipeline(components), CAPTIONS, t5_length)
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds", "attention_mask"}
    assert ours["prompt_embeds"].shape[1] == t5_length == text_ids.shape[0]
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    expected_mask = components["tokenizer_2"](CAPTIONS, padding="max_length", max_length=t5_length, truncation=True,
                                              return_tensors="pt").attention_mask
    assert torch.equal(ours["attention_mask"], expected_mask)


def test_t5_zero_padding(tiny):
    family, components, _ = load(tiny["dev"], t5_padding="zero", tokenizer_max_length=24)
    ours = family.text_outputs(components, CAPTIONS)
    padding = ~ours["attention_mask"].bool()
    assert padding.any() and not ours["prompt_embeds"][padding].any()


# ---------------------------------------------------------------- guidance and masking
def _inputs(family, components, batch_size=2, seed=0):
    latents = torch.randn(batch_size, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    text = family.text_outputs(components, CAPTIONS[:batch_size])
    return latents, text


def test_constant_guidance_is_the_configured_value(tiny):
    family, components, _ = load(tiny["dev"], flux_guidance_value=2.5)
    latents, text = _inputs(family, components)
    timesteps = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        ours = family.predict(components, latents, timesteps, text, {})
        transformer = components["transformer"]
        direct = transformer(hidden_states=pack_latents(latents), timestep=timesteps / 1000,
                             guidance=torch.tensor([2.5, 2.5]), pooled_projections=text["pooled_prompt_embeds"],
                             encoder_hidden_states=text["prompt_embeds"], txt_ids=torch.zeros(128, 3),
                             img_ids=latent_image_ids(8, 8, torch.device("cpu"), torch.float32),
                             return_dict=False)[0]
    torch.testing.assert_close(ours, unpack_latents(direct, 8, 8), rtol=0, atol=0)


def test_random_range_guidance_is_drawn_per_sample_from_the_generator(tiny):
    family, components, _ = load(tiny["dev"], flux_guidance_mode="random-range", flux_guidance_min=1.0,
                                 flux_guidance_max=3.0)
    latents, text = _inputs(family, components, batch_size=2)
    batch = {"latents": latents}
    first = family.draw_conditioning(components, batch, torch.Generator().manual_seed(5))
    again = family.draw_conditioning(components, batch, torch.Generator().manual_seed(5))
    assert "guidance" not in batch and torch.equal(first["guidance"], again["guidance"])
    many = family.draw_conditioning(components, {"latents": torch.zeros(4000, 1, 2, 2)},
                                    torch.Generator().manual_seed(6))["guidance"]
    assert many.min() >= 1.0 and many.max() <= 3.0 and abs(many.mean().item() - 2.0) < 0.05
    timesteps = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        drawn = family.predict(components, latents, timesteps, text, first)
        constant = family.predict(components, latents, timesteps, text, {"guidance": torch.tensor([1.0, 1.0])})
    assert not torch.allclose(drawn, constant)
    _, constant_components, _ = load(tiny["dev"])
    assert "guidance" not in family.draw_conditioning(constant_components, batch)


def test_schnell_gets_no_guidance(tiny):
    family, components, _ = load(tiny["schnell"], flux_guidance_mode="random-range")
    latents, text = _inputs(family, components)
    assert family.guidance(components, {}, 2, latents.device) is None
    assert "guidance" not in family.draw_conditioning(components, {"latents": latents})
    with torch.no_grad():
        prediction = family.predict(components, latents, torch.tensor([500.0, 1000.0]), text, {})
    assert prediction.shape == latents.shape and torch.isfinite(prediction).all()


def test_attention_masked_training_ignores_padding_embeddings(tiny):
    family, masked, _ = load(tiny["dev"], flux_attention_masked_training=True, tokenizer_max_length=24)
    latents, text = _inputs(family, masked)
    padding = ~text["attention_mask"].bool()
    assert padding.any()
    noisy_text = dict(text, prompt_embeds=text["prompt_embeds"].masked_fill(padding[..., None], 7.0))
    timesteps = torch.tensor([500.0, 250.0])
    with torch.no_grad():
        clean = family.predict(masked, latents, timesteps, text, {})
        perturbed = family.predict(masked, latents, timesteps, noisy_text, {})
        _, unmasked, _ = load(tiny["dev"], tokenizer_max_length=24)
        leaky = family.predict(unmasked, latents, timesteps, noisy_text, {})
    torch.testing.assert_close(clean, perturbed, rtol=0, atol=1e-5)
    assert not torch.allclose(clean, leaky, atol=1e-3)


# ---------------------------------------------------------------- adapters
def test_every_lora_preset_names_modules_of_the_full_size_transformer():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel()  # FLUX.1's published architecture: 19 + 38 blocks
    names = [name for name, _ in transformer.named_modules()]
    family = get_family("flux")
    for preset in FLUX_ADAPTER_PRESETS:
        needs = {"controlnet": True} if preset == "controlnet" else {}  # that preset adapts a ControlNet
        targets = family.adapter_targets(config("x", flux_lora_target=preset, **needs))
        for target in targets:
            assert any(name == target or name.endswith("." + target) for name in names), (preset, target)
    all_targets = set(family.adapter_targets(config("x")))
    assert {"to_q", "add_q_proj", "to_add_out"} <= all_targets and "ff.net.2" not in all_targets
    assert set(FLUX_ADAPTER_PRESETS["context"]).isdisjoint(FLUX_ADAPTER_PRESETS["mmdit"])
    assert set(FLUX_ADAPTER_PRESETS["all+ffs"]) > all_targets


def test_lycoris_targets_the_flux_blocks(tiny):
    from simpletuner.train.adapters import apply_lycoris

    family, components, _ = load(tiny["dev"])
    network = apply_lycoris(components["transformer"], {"algo": "lokr", "factor": 4}, targets=family.lycoris_targets)
    assert sum(p.numel() for p in network.parameters()) > 0


def test_lora_export_loads_into_the_flux_pipeline(tiny, tmp_path):
    from simpletuner.publish.lora_files import save_lora_weights
    from simpletuner.train.adapters import apply_lora

    family, components, cfg = load(tiny["dev"])
    transformer = apply_lora(components["transformer"], rank=4, target_modules=family.adapter_targets(cfg))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path = save_lora_weights(tmp_path, "FluxPipeline", {"transformer": transformer})
    pipe = FluxPipeline.from_pretrained(tiny["dev"])
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    latents, text = _inputs(family, components, batch_size=1)
    with torch.no_grad():
        ours = family.predict(components, latents, torch.tensor([500.0]), text, {})
        theirs = family.predict(components.__class__(dict(components.modules, transformer=pipe.transformer),
                                                     components.noise_scheduler, components.source,
                                                     components.pipeline_class, components.settings),
                                latents, torch.tensor([500.0]), text, {})
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert pipe(**sample_kwargs("flux"), output_type="np").images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- pipeline
def test_pipeline_samples_two_steps_with_guidance_and_true_cfg(tiny):
    family, components, cfg = load(tiny["dev"])
    pipe = family.pipeline(components)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.scheduler.config.use_dynamic_shifting
    images = pipe(**sample_kwargs("flux"), output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)
    validation = cfg.model_copy(update={"validation_num_inference_steps": 2, "validation_guidance": 3.5})
    plain = family.sample_images(pipe, validation, "a cat", 32, 32, torch.Generator().manual_seed(0))
    true_cfg = family.sample_images(pipe, validation.model_copy(update={"validation_guidance_real": 4.0}),
                                    "a cat", 32, 32, torch.Generator().manual_seed(0))
    assert plain[0].size == true_cfg[0].size == (32, 32)
    assert plain[0].tobytes() != true_cfg[0].tobytes()  # the negative prompt took part


def test_schnell_pipeline_samples(tiny):
    family, components, cfg = load(tiny["schnell"])
    images = family.pipeline(components)(**sample_kwargs("flux"), output_type="np").images
    assert images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- parity with a plain diffusers step
def _reference_loss(components, images, captions, noise, sigmas, weighting, length, guidance_scale):
    """train_dreambooth_lora_flux.py's step, written against diffusers' classes."""
    vae, transformer = components["vae"], components["transformer"]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    model_input = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(4))
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    pipe = FluxPipeline(scheduler=components["scheduler"], vae=vae, text_encoder=components["text_encoder"],
                        tokenizer=components["tokenizer"], text_encoder_2=components["text_encoder_2"],
                        tokenizer_2=components["tokenizer_2"], transformer=transformer)
    prompt_embeds, pooled_prompt_embeds, text_ids = encode_prompt(pipe, captions, length)
    bsz = model_input.shape[0]
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(bsz, model_input.shape[2] // 2,
                                                              model_input.shape[3] // 2, model_input.device,
                                                              model_input.dtype)
    timesteps = sigmas * 1000
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed_noisy_model_input = FluxPipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1],
                                                          model_input.shape[2], model_input.shape[3])
    guidance = torch.tensor([guidance_scale]).expand(bsz) if transformer.config.guidance_embeds else None
    model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                             txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
    model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * vae_scale_factor,
                                              width=model_input.shape[3] * vae_scale_factor,
                                              vae_scale_factor=vae_scale_factor)
    loss_weights = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((loss_weights.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    return loss.mean()


@pytest.mark.parametrize(("kind", "weighting", "guidance"), [("dev", "none", 1.0), ("dev", "cosmap", 3.5),
                                                             ("dev", "sigma_sqrt", 1.0), ("schnell", "none", 1.0)])
def test_loss_parity_with_a_plain_diffusers_step(tiny, kind, weighting, guidance):
    family, components, cfg = load(tiny[kind], flow_loss_weighting=weighting, flux_guidance_value=guidance,
                                   tokenizer_max_length=32)
    images = pixels(seed=21)
    sigmas = torch.tensor([0.3, 0.6, 0.97])
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
        batch = family.draw_conditioning(components, {"latents": latents,
                                                      "text": family.text_outputs(components, CAPTIONS)})
        draw = NoiseDraw(noise=noise, timesteps=sigmas * 1000)
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)
        reference = _reference_loss(components, images, CAPTIONS, noise, sigmas, weighting, 32, guidance)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- end to end through the CLI
@pytest.mark.slow
def test_lora_run_writes_a_lora_that_the_flux_pipeline_loads(tmp_path, tiny):
    from train_helpers import metrics, write_run

    from simpletuner.cli import main

    config = write_run(tmp_path, tiny["dev"], "flux", tokenizer_max_length=32, t5_padding="zero",
                       flux_attention_masked_training=True, flux_guidance_mode="random-range",
                       flow_schedule_auto_shift=True, flux_lora_target="all+ffs")
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    losses = metrics(output)
    assert sorted(losses) == [1, 2, 3, 4] and all(loss == loss for loss in losses.values())
    assert (output / "validation" / "step-4" / "validation-32x32-0.png").is_file()
    pipeline = FluxPipeline.from_pretrained(tiny["dev"])
    kwargs = dict(sample_kwargs("flux"), output_type="np")
    before = pipeline(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    after = pipeline(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (after == after).all() and not (before == after).all()


def test_half_precision_frozen_transformer_takes_fp32_inputs(tiny):
    family = get_family("flux")
    cfg = config(tiny["dev"], tokenizer_max_length=16, flux_attention_masked_training=True)
    components = family.load(cfg, DTypePolicy(denoiser=torch.bfloat16))
    latents, text = _inputs(family, components)
    draw = NoiseDraw(noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)),
                     timesteps=torch.tensor([250.0, 750.0]))
    with torch.no_grad():
        loss = training_loss(family, components, family.objective(cfg, components),
                             {"latents": latents, "text": text}, draw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
