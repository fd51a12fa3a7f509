"""Hunyuan-DiT on its tiny real diffusers model (HunyuanDiT2DModel, BERT + mT5 text, v-prediction).

Covers declarations and flavours, text outputs against HunyuanDiTPipeline.encode_prompt for both
encoders, the learned-sigma split, image size / crop / style conditioning (v1.1) and its absence
(v1.2), caption dropout, LoRA (peft format) and LyCORIS on the transformer, sampling, wrong-family
errors, and loss parity with a plain step written against diffusers' classes the way the pipeline
conditions the transformer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.base import DTypePolicy
from simpletuner.models.hunyuandit import HunyuanDiTFamily
from simpletuner.models.registry import get_family
from simpletuner.models.objectives import NoiseDraw, training_loss

FP32 = DTypePolicy()
CAPTIONS = ["A Red Cat on a mat  ", "", "an astronaut riding a horse, oil painting"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in ("hunyuan_dit", "pixart_sigma")}


def config(path: Path | str, **options) -> TrainingConfig:
    return TrainingConfig(model_family="hunyuan_dit", pretrained_model_name_or_path=str(path), **options)


@pytest.fixture(scope="module")
def loaded(tiny):
    cfg = config(tiny["hunyuan_dit"])
    family = get_family("hunyuan_dit")
    return family, family.load(cfg, FP32), cfg


def pixels(batch: int = 3, size: int = 32, seed: int = 21) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def encode_prompt(components, captions=CAPTIONS):
    """Both encoders as HunyuanDiTPipeline.__call__ runs encode_prompt (77 BERT, 256 mT5 tokens)."""
    pipe = HunyuanDiTFamily().pipeline(components)
    with torch.no_grad():
        embeds, _, mask, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False,
                                                max_sequence_length=77, text_encoder_index=0)
        embeds_2, _, mask_2, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False,
                                                    max_sequence_length=256, text_encoder_index=1)
    return embeds, mask, embeds_2, mask_2


def with_transformer(components, transformer):
    modules = dict(components.modules, transformer=transformer)
    return type(components)(modules=modules, noise_scheduler=components.noise_scheduler, source=components.source,
                            pipeline_class=components.pipeline_class, settings=components.settings)


def test_declarations_and_flavours():
    family = get_family("hunyuan_dit")
    assert isinstance(family, HunyuanDiTFamily)
    assert (family.alignment, family.native_resolution, family.default_prediction_type) == (16, 1024, "v_prediction")
    assert family.latent_channels == 4 and family.denoiser_name() == "transformer"
    assert family.lycoris_targets == ("HunyuanDiTBlock",)
    assert family.flavours.checkpoints == {
        "v1.1": "Tencent-Hunyuan/HunyuanDiT-v1.1-Diffusers",
        "v1.2": "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers",
        "v1.2-distilled": "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers-Distilled",
    }
    assert family.flavours.checkpoint(None) == "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    assert family.default_resolution(config("x")) == 1024
    family.check_resolution(1024, 768)
    with pytest.raises(UserError, match="multiples of 16"):
        family.check_resolution(1032, 768)


def test_load_reads_the_text_lengths_from_the_transformer(loaded, tiny):
    family, components, _ = loaded
    transformer = components["transformer"]
    assert family.denoiser(components) is transformer
    assert transformer.config.learn_sigma and transformer.out_channels == 2 * transformer.config.in_channels
    assert (components.settings["text_len"], components.settings["text_len_t5"]) == (77, 256)
    assert components.settings["prediction_type"] == "v_prediction"
    with pytest.raises(UserError, match=r"tokenizer_max_length=40 does not suit model_family 'hunyuan_dit'.*77.*256"):
        family.load(config(tiny["hunyuan_dit"], tokenizer_max_length=40), FP32)
    # diffusers' HunyuanDiT2DModel has no gradient checkpointing: a clear error, not its ValueError mid-setup
    with pytest.raises(UserError, match=r"gradient_checkpointing=true does not suit model_family 'hunyuan_dit'"):
        family.load(config(tiny["hunyuan_dit"], gradient_checkpointing=True), FP32)


def test_text_outputs_match_encode_prompt(loaded):
    family, components, _ = loaded
    ours = family.text_outputs(components, CAPTIONS)
    embeds, mask, embeds_2, mask_2 = encode_prompt(components)
    assert set(ours) == {"prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2"}
    assert ours["prompt_embeds"].shape == (3, 77, components["text_encoder"].config.hidden_size)
    assert ours["prompt_embeds_2"].shape == (3, 256, components["text_encoder_2"].config.d_model)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["prompt_embeds_2"], embeds_2, rtol=0, atol=0)
    assert torch.equal(ours["prompt_attention_mask"], mask) and torch.equal(ours["prompt_attention_mask_2"], mask_2)
    assert mask[1].sum() == 2 and mask[0].sum() > 2  # BERT: the empty caption is [CLS] [SEP]
    assert mask_2[1].sum() == 1 and mask_2[0].sum() > 1  # mT5: the empty caption is its end token


def test_adapter_targets_name_block_modules_only(loaded):
    family, components, cfg = loaded
    names = [name for name, _ in components["transformer"].named_modules()]
    for preset in ("attention", "attention+ffs"):
        for target in family.adapter_targets(cfg.model_copy(update={"unet_lora_target": preset})):
            matches = [name for name in names if name.endswith("." + target)]
            assert matches and all(name.startswith("blocks.") for name in matches), target


def test_caption_dropout_takes_both_encoders_empty_captions(loaded):
    family, components, _ = loaded
    text = family.text_outputs(components, CAPTIONS)
    empty = family.text_outputs(components, [""])
    dropped, _ = family.drop_captions(components, text, empty, torch.tensor([True, True, False]), {})
    for key in ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2"):
        assert torch.equal(dropped[key][2], empty[key][0]), key
        assert torch.equal(dropped[key][0], text[key][0]), key


def test_sample_conditioning_is_height_width():
    from simpletuner.data.records import ImagePlan

    plan = ImagePlan(original_size=(1200, 800), resized_size=(1536, 1024), crop_box=(256, 0, 1280, 1024),
                     target_size=(1024, 1024))
    conditioning = get_family("hunyuan_dit").sample_conditioning(plan)
    assert conditioning["original_size"].tolist() == [800, 1200]
    assert conditioning["crop_top_left"].tolist() == [0, 256]
    assert conditioning["target_size"].tolist() == [1024, 1024]


def test_predict_returns_the_noise_half_of_the_learned_sigma_output(loaded):
    family, components, _ = loaded
    latents = torch.randn((2, 4, 4, 6), generator=torch.Generator().manual_seed(0))
    text = family.text_outputs(components, CAPTIONS[:2])
    with torch.no_grad():
        prediction = family.predict(components, latents, torch.tensor([3, 700]), text, {})
    assert prediction.shape == latents.shape and torch.isfinite(prediction).all()
    # a frozen bf16 base (LoRA) takes bf16 inputs, timesteps included, as the pipeline passes them
    half = with_transformer(components, copy.deepcopy(components["transformer"]).to(torch.bfloat16))
    with torch.no_grad():
        in_bf16 = family.predict(half, latents, torch.tensor([3, 700]), text, {"original_size": [[48.0, 64.0]] * 2})
    assert in_bf16.dtype == torch.bfloat16 and torch.isfinite(in_bf16).all()


# ---------------------------------------------------------------- parity with a plain diffusers step
SIZES = {"original_size": torch.tensor([[600.0, 800.0]] * 3), "crop_top_left": torch.tensor([[8.0, 16.0]] * 3),
         "target_size": torch.tensor([[32.0, 32.0]] * 3)}


def _reference_loss(components, latents, noise, timesteps, meta) -> torch.Tensor:
    """A v-prediction step against diffusers' classes, the transformer conditioned as HunyuanDiTPipeline does."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    transformer = components["transformer"]
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps)
    patch = transformer.config.patch_size
    grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)  # (height // 8 // patch, width // 8 // patch)
    rotary = get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads,
                                     get_resize_crop_region_for_grid(grid, 512 // 8 // patch), grid, output_type="pt")
    embeds, mask, embeds_2, mask_2 = encode_prompt(components)
    model_pred = transformer(noisy, timesteps.float(), encoder_hidden_states=embeds, text_embedding_mask=mask,
                             encoder_hidden_states_t5=embeds_2, text_embedding_mask_t5=mask_2,
                             image_meta_size=meta, style=torch.zeros(len(latents), dtype=torch.long),
                             image_rotary_emb=rotary).sample.chunk(2, 1)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _losses(family, components, cfg, batch_extra, meta):
    images = pixels()
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
        batch = {"latents": latents, "text": family.text_outputs(components, CAPTIONS), **batch_extra}
        draw = NoiseDraw(noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(11)),
                         timesteps=torch.tensor([17, 999, 500]))
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)
        vae = components["vae"]
        reference_latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(4))
        reference_latents = reference_latents * vae.config.scaling_factor
        reference = _reference_loss(components, reference_latents, draw.noise, draw.timesteps, meta)
    return ours, reference


def test_loss_parity_with_a_plain_diffusers_step(loaded):
    family, components, cfg = loaded
    # (orig_h, orig_w, target_h, target_w, crop_top, crop_left): the pipeline's add_time_ids order
    meta = torch.tensor([[600.0, 800.0, 32.0, 32.0, 8.0, 16.0]] * 3)
    ours, reference = _losses(family, components, cfg, SIZES, meta)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # without sizes in the batch: the latents' size in pixels, no crop
    plain, plain_reference = _losses(family, components, cfg, {}, torch.tensor([[32.0, 32.0, 32.0, 32.0, 0, 0]] * 3))
    torch.testing.assert_close(plain, plain_reference, rtol=0, atol=1e-5)
    assert abs(ours - plain) > 1e-6  # v1.1's size conditioning reaches the model


def test_v1_2_transformer_ignores_size_conditioning(loaded):
    """v1.2 turns image size and style conditioning off (use_style_cond_and_image_meta_size: false)."""
    from diffusers import HunyuanDiT2DModel

    family, components, cfg = loaded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        transformer = HunyuanDiT2DModel.from_config(components["transformer"].config,
                                                    use_style_cond_and_image_meta_size=False)
    v12 = with_transformer(components, transformer)
    ours, reference = _losses(family, v12, cfg, SIZES, torch.zeros(3, 6))
    plain, _ = _losses(family, v12, cfg, {}, torch.zeros(3, 6))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert torch.equal(ours, plain)


# ---------------------------------------------------------------- adapters
def test_lora_on_the_transformer_trains_and_exports_in_peft_format(tiny, tmp_path):
    from diffusers import HunyuanDiT2DModel
    from peft import PeftModel

    from simpletuner.train.adapters import prepare_trainable

    family = get_family("hunyuan_dit")
    cfg = config(tiny["hunyuan_dit"], model_type="lora", lora_rank=2, unet_lora_target="attention+ffs")
    components = family.load(cfg, FP32)
    trained = prepare_trainable(family.denoiser(components), cfg, family.adapter_targets(cfg),
                                prefix=family.denoiser_name())
    latents = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
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
        ours = family.predict(components, latents, draw.timesteps, batch["text"], {})
    from simpletuner.publish.export import LORA_FORMATS
    from simpletuner.train.adapters import TrainedLora

    lora = TrainedLora.from_models(components.pipeline_class, {"transformer": trained.model})
    written = LORA_FORMATS["diffusers"].write(family, lora, tmp_path / "lora")  # peft's folder: no LoRA loader
    assert written.name == "adapter_model.safetensors" and (tmp_path / "lora" / "adapter_config.json").is_file()

    base = HunyuanDiT2DModel.from_pretrained(tiny["hunyuan_dit"], subfolder="transformer")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora")
    saved = {name for name, _ in trained.model.named_parameters() if "lora" in name}
    assert saved == {name.removeprefix("base_model.model.") for name, _ in peft_model.named_parameters()
                     if "lora" in name}  # every tensor loads
    plain = HunyuanDiT2DModel.from_pretrained(tiny["hunyuan_dit"], subfolder="transformer")
    with torch.no_grad():
        theirs = family.predict(with_transformer(components, peft_model.base_model.model), latents, draw.timesteps,
                                batch["text"], {})
        untrained = family.predict(with_transformer(components, plain), latents, draw.timesteps, batch["text"], {})
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(untrained, ours)


def test_lycoris_adapts_the_hunyuan_blocks(loaded):
    from simpletuner.train.adapters import apply_lycoris

    family, _, cfg = loaded
    components = family.load(cfg, FP32)  # a copy of its own: LyCORIS wraps modules in place
    network = apply_lycoris(components["transformer"], {"algo": "lokr", "factor": 4}, targets=family.lycoris_targets)
    adapted = {lora.lora_name for lora in network.loras}
    assert adapted and all("blocks_" in name for name in adapted)
    assert any("attn2_to_k" in name for name in adapted) and any("ff_net_2" in name for name in adapted)


# ---------------------------------------------------------------- pipelines and errors
def test_pipeline_samples_two_steps_at_a_tiny_size(loaded):
    family, components, cfg = loaded
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    run = cfg.model_copy(update={"validation_num_inference_steps": 2, "num_validation_images": 1})
    images = family.sample_images(pipe, run, "a cat", 48, 32, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(48, 32)]  # exactly the asked size: no resolution binning
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == cfg.inference_scheduler_timestep_spacing
    assert type(pipe).__name__ == "HunyuanDiTPipeline"


def test_wrong_family_is_named(tiny):
    with pytest.raises(UserError, match=r"PixArtSigmaPipeline \(pixart_sigma\).*'hunyuan_dit'"):
        get_family("hunyuan_dit").load(config(tiny["pixart_sigma"]), FP32)
    with pytest.raises(UserError, match=r"HunyuanDiTPipeline \(hunyuan_dit\).*'pixart_sigma'"):
        get_family("pixart_sigma").load(TrainingConfig(model_family="pixart_sigma",
                                                       pretrained_model_name_or_path=str(tiny["hunyuan_dit"])), FP32)


def test_tiny_tokenizers_are_bert_wordpiece_and_mt5_at_the_pipeline_lengths(loaded):
    _, components, _ = loaded
    bert, mt5 = components["tokenizer"], components["tokenizer_2"]
    assert (bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id) == (0, 1, 2, 3)
    assert components["text_encoder"].config.pad_token_id == bert.pad_token_id
    assert bert.convert_ids_to_tokens(bert("A Red fox, xylo").input_ids) == [
        "[CLS]", "a", "red", "fox", ",", "x", "##y", "##l", "##o", "[SEP]"]  # unseen words are spelled out
    assert (bert.model_max_length, mt5.model_max_length) == (77, 256)
    assert (mt5.pad_token_id, mt5.eos_token_id) == (0, 1)


def test_simpletuner_configs_name_the_family(tmp_path):
    """SimpleTuner's model_family value and its old `hunyuan_dit` switch both choose this family."""
    import json

    from simpletuner.config.load import load_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--hunyuan_dit": "true", "--pretrained_model_name_or_path": "x", "--output_dir": "o"}))
    assert load_config(path).model_family == "hunyuan_dit"
    path.write_text(json.dumps({"model_family": "hunyuan_dit", "pretrained_model_name_or_path": "x"}))
    assert load_config(path).model_family == "hunyuan_dit"
