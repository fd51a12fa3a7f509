import json

import numpy as np
import pytest
import torch

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError, UserError
from simpletuner.publish.lora_files import save_lora_weights
from simpletuner.train.adapters import LORA_WEIGHTS, prepare_trainable, save_lycoris_weights
from simpletuner.train.checkpoint import trainable_tensors

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _cfg(**options) -> TrainingConfig:
    base = dict(model_family="sd1x", pretrained_model_name_or_path="tiny", model_type="lora", lora_rank=4)
    return TrainingConfig(**{**base, **options})


def _unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def _pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline; sampled from prompt embeddings, so it needs no tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=100, max_position_embeddings=16))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=_unet(seed),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)


def _sample(pipeline) -> np.ndarray:
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    return pipeline(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
                    height=32, width=32, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(4)).images


def _predict(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    sample, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text).sample


def _train_a_little(parameters) -> None:
    """Stand-in for training: every adapter weight moves away from its (partly zero) start."""
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_lora_trains_only_the_adapter():
    unet = _unet()
    trained = prepare_trainable(unet, _cfg(), TARGETS)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trained.kind == "lora" and trained.module is unet and names
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(trained.parameters()) == len(names) == 8 * 4 * 2  # 8 attention layers x 4 projections x (A, B)
    assert set(trainable_tensors(trained.module)) == set(names)  # what checkpoints hold


def test_full_training_trains_everything():
    unet = _unet().requires_grad_(False)
    trained = prepare_trainable(unet, _cfg(model_type="full"), TARGETS)
    assert trained.kind == "full" and all(p.requires_grad for p in unet.parameters())
    assert len(trained.parameters()) == len(list(unet.parameters()))


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_lora_loads_into_a_pipeline_and_reproduces_the_adapted_model(tmp_path, use_dora):
    unet = _unet()
    trained = prepare_trainable(unet, _cfg(lora_alpha=8, use_dora=use_dora), TARGETS)
    if use_dora:
        assert any("lora_magnitude_vector" in n for n, p in unet.named_parameters() if p.requires_grad)
    _train_a_little(trained.parameters())
    path = save_lora_weights(tmp_path, "StableDiffusionPipeline", {"unet": unet})
    assert path == tmp_path / LORA_WEIGHTS and path.is_file()

    pipeline = _pipeline()
    before = _sample(pipeline)
    pipeline.load_lora_weights(tmp_path, weight_name=LORA_WEIGHTS)
    assert not np.allclose(before, _sample(pipeline), atol=1e-4)
    # alpha / rank scaling and DoRA travel with the file: the pipeline's UNet is the adapted one
    torch.testing.assert_close(_predict(pipeline.unet), _predict(unet))


def test_init_lora_restores_the_weights(tmp_path):
    source = _unet()
    trained = prepare_trainable(source, _cfg(), TARGETS)
    _train_a_little(trained.parameters())
    file = save_lora_weights(tmp_path, "StableDiffusionPipeline", {"unet": source})

    fresh = _unet()
    prepare_trainable(fresh, _cfg(init_lora=str(file)), TARGETS)
    for (name, a), (_, b) in zip(source.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_init_lora_of_another_rank_is_refused(tmp_path):
    source = _unet()
    prepare_trainable(source, _cfg(lora_rank=2), TARGETS)
    file = save_lora_weights(tmp_path, "StableDiffusionPipeline", {"unet": source})
    with pytest.raises(UserError, match=r"does not fit this LoRA.*0 weights missing, 64 of another shape"):
        prepare_trainable(_unet(), _cfg(lora_rank=4, init_lora=str(file)), TARGETS)
    with pytest.raises(UserError, match="no such file"):
        prepare_trainable(_unet(), _cfg(init_lora=str(tmp_path / "absent.safetensors")), TARGETS)


def test_targets_that_match_nothing_are_a_config_error():
    with pytest.raises(ConfigError, match=r"target modules \['no_such_layer'\] do not fit UNet2DConditionModel"):
        prepare_trainable(_unet(), _cfg(), ["no_such_layer"])


def _lycoris_cfg(tmp_path, **options) -> TrainingConfig:
    config = tmp_path / "lycoris.json"
    config.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1}))
    return _cfg(lora_type="lycoris", lycoris_config=str(config), init_lokr_norm=1e-3, **options)


def test_lycoris_lokr_creates_trains_and_saves(tmp_path):
    from lycoris import create_lycoris_from_weights

    unet = _unet()
    base_output = _predict(unet)
    trained = prepare_trainable(unet, _lycoris_cfg(tmp_path), TARGETS)
    assert trained.kind == "lycoris" and trained.module is not unet
    assert not any(p.requires_grad for p in unet.parameters())
    names = list(trainable_tensors(trained.module))
    assert names and all("lokr_w" in n for n in names)
    _train_a_little(trained.parameters())
    adapted_output = _predict(unet)
    assert not torch.allclose(adapted_output, base_output)

    path = save_lycoris_weights(tmp_path / "out", trained.module, {"algo": "lokr"})
    assert path.name == LORA_WEIGHTS
    fresh = _unet()
    network, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    network.apply_to()
    torch.testing.assert_close(_predict(fresh), adapted_output)

    restored = _unet()
    again = prepare_trainable(restored, _lycoris_cfg(tmp_path, init_lora=str(path)), TARGETS)
    for (name, a), b in zip(trainable_tensors(trained.module).items(), trainable_tensors(again.module).values()):
        assert torch.equal(a, b), name


def test_lycoris_needs_a_config(tmp_path):
    with pytest.raises(ConfigError, match="lora_type='lycoris' needs lycoris_config"):
        prepare_trainable(_unet(), _cfg(lora_type="lycoris"), TARGETS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"factor": 4}')
    with pytest.raises(ConfigError, match="must be a JSON object with an 'algo' key"):
        prepare_trainable(_unet(), _cfg(lora_type="lycoris", lycoris_config=str(bad)), TARGETS)


@pytest.mark.parametrize("kind", ["lora", "lycoris"])
def test_checkpoints_restore_the_adapter(tmp_path, kind):
    from simpletuner.train.checkpoint import Progress, load_checkpoint, save_checkpoint

    cfg = _cfg(use_dora=True) if kind == "lora" else _lycoris_cfg(tmp_path)
    unet = _unet()
    trained = prepare_trainable(unet, cfg, TARGETS)
    _train_a_little(trained.parameters())
    path = save_checkpoint(tmp_path / "run", Progress(1, 0), modules={"unet": trained.module}, states={})
    fresh = _unet()
    restored = prepare_trainable(fresh, cfg, TARGETS)
    assert not torch.allclose(_predict(fresh), _predict(unet))
    load_checkpoint(path, modules={"unet": restored.module}, states={})
    torch.testing.assert_close(_predict(fresh), _predict(unet), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lora", "lycoris"])
def test_base_model_switches_the_adapter_off_and_back_on(tmp_path, kind):
    """Regularisation data's targets: inside base_model() the model predicts as before the adapter."""
    unet = _unet()
    base_output = _predict(unet)
    cfg = _lycoris_cfg(tmp_path) if kind == "lycoris" else _cfg()
    trained = prepare_trainable(unet, cfg, TARGETS)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.1)
    adapted_output = _predict(unet)
    assert not torch.allclose(adapted_output, base_output)
    with trained.base_model():
        torch.testing.assert_close(_predict(unet), base_output)
    torch.testing.assert_close(_predict(unet), adapted_output)


def test_base_model_of_full_training_is_an_error():
    trained = prepare_trainable(_unet(), _cfg(model_type="full"), TARGETS)
    with pytest.raises(ConfigError, match="is_regularisation_data"), trained.base_model():
        pass
