"""fuse_qkv_projections: diffusers' fused attention projections in full training; the saved model unchanged
(with a LoRA: tests/test_fusion_lora.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.errors import UserError
from simpletuner.train.fusion import FUSED_PARTS, fuse_qkv, unfuse_qkv


def _denoiser(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    return getattr(pipe, "transformer", None) or pipe.unet


def _fused_layers(model):
    return [(module, name) for module in model.modules() for name in FUSED_PARTS
            if isinstance(getattr(module, name, None), torch.nn.Linear)]


def test_projections_become_frozen_views_of_the_fused_rows_and_come_back_apart(tiny_model):
    model = _denoiser(tiny_model("sd3"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert fuse_qkv(model) == 4  # two joint blocks: image to_qkv and text to_added_qkv each
    attention = model.transformer_blocks[0].attn
    q_rows = attention.to_q.out_features
    assert attention.to_q.weight.data_ptr() == attention.to_qkv.weight.data_ptr()
    assert not attention.to_q.weight.requires_grad and attention.to_qkv.weight.requires_grad
    with torch.no_grad():  # an optimiser writes the fused weight in place; the parts follow
        attention.to_qkv.weight.add_(1.0)
        attention.to_added_qkv.bias.add_(2.0)
    torch.testing.assert_close(attention.to_k.weight, before["transformer_blocks.0.attn.to_k.weight"] + 1.0)
    torch.testing.assert_close(attention.add_v_proj.bias, before["transformer_blocks.0.attn.add_v_proj.bias"] + 2.0)
    assert attention.to_q.weight.shape == (q_rows, attention.to_qkv.in_features)

    unfuse_qkv(model)
    assert not _fused_layers(model) and not attention.fused_projections
    assert model.state_dict().keys() == before.keys()
    trained_k = attention.to_k.weight.clone()
    with torch.no_grad():
        attention.to_q.weight.add_(1.0)
    torch.testing.assert_close(attention.to_k.weight, trained_k)  # each owns its weights again
    assert attention.to_q.weight.requires_grad


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart_sigma", "sdxl"])
def test_fused_forward_equals_the_unfused_one(tiny_model, family):
    model = _denoiser(tiny_model(family))
    inputs = _inputs(model, family)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        fuse_qkv(model)
        calls = []
        hooks = [getattr(module, name).register_forward_hook(lambda *_: calls.append(1))
                 for module, name in _fused_layers(model)]
        fused = model(**inputs, return_dict=False)[0]
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(hooks) > 0  # the fused layers did the work
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


def _inputs(model, family: str) -> dict:
    g = torch.Generator().manual_seed(3)
    config = model.config
    if family == "sdxl":
        added = {"text_embeds": torch.randn(2, 64, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
        return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                    encoder_hidden_states=torch.randn(2, 7, config.cross_attention_dim, generator=g),
                    added_cond_kwargs=added)
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([10.0, 500.0]),
                    encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g))
    if family == "pixart_sigma":
        return dict(hidden_states=torch.randn(2, config.in_channels, 8, 8, generator=g),
                    timestep=torch.tensor([10, 500]),
                    encoder_hidden_states=torch.randn(2, 7, config.caption_channels, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(2, 16, config.in_channels, generator=g), timestep=torch.tensor([0.1, 0.5]),
                encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                guidance=torch.tensor([3.5, 3.5]) if config.guidance_embeds else None,
                txt_ids=torch.zeros(7, 3), img_ids=ids)


def test_deepfloyd_unet_with_added_kv_attention_is_refused_by_name(tiny_model):
    with pytest.raises(UserError, match="fuse_qkv_projections=true: UNet2DConditionModel: .*added KV"):
        fuse_qkv(_denoiser(tiny_model("deepfloyd_if")))


def test_fusion_is_accepted_with_full_training_and_a_lora_and_false_always(tmp_path, tiny_model):
    for model_type, fused in (("lora", True), ("full", True), ("lora", False)):
        config = write_run(tmp_path / f"{model_type}-{fused}", tiny_model("sd1x"), "sd1x", model_type=model_type,
                           fuse_qkv_projections=fused)
        assert main(["config", "check", str(config)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "pixart_sigma", "sd1x"])
def test_full_training_fused_matches_unfused_and_saves_the_same_model(tmp_path, tiny_model, family):
    from diffusers import DiffusionPipeline

    model = tiny_model(family)
    options = dict(model_type="full", learning_rate=1e-4, max_train_steps=3, checkpointing_steps=2,
                   validation_steps=3, validation_num_inference_steps=2, tokenizer_max_length=32)
    if family == "sd1x":
        options.pop("tokenizer_max_length")
    runs = {}
    for fused in (False, True):
        root = tmp_path / ("fused" if fused else "plain")
        config = write_run(root, model, family, fuse_qkv_projections=fused, images=6,
                           dataset=tmp_path / "plain" / "dataset" if fused else None, **options)
        assert main(["train", str(config)]) == 0
        runs[fused] = root / "output"
    plain, fused = metrics(runs[False]), metrics(runs[True])
    assert sorted(plain) == sorted(fused) == [1, 2, 3]
    for step in plain:
        assert abs(plain[step] - fused[step]) <= 1e-5, (step, plain[step], fused[step])
    assert (runs[True] / "validation" / "step-3").is_dir()
    saved = {fused: DiffusionPipeline.from_pretrained(runs[fused] / "pipeline") for fused in (False, True)}
    denoisers = {k: getattr(p, "transformer", None) or p.unet for k, p in saved.items()}
    plain_weights, fused_weights = denoisers[False].state_dict(), denoisers[True].state_dict()
    assert fused_weights.keys() == plain_weights.keys()  # diffusers' separate projections, no to_qkv
    original = _denoiser(model).state_dict()
    assert any(not torch.equal(original[name], fused_weights[name]) for name in original if ".to_k." in name)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fused_full_training_resumes_exactly_and_refuses_an_unfused_checkpoint(tmp_path, tiny_model, capsys):
    import shutil

    from diffusers import DiffusionPipeline

    model = tiny_model("sd1x")
    options = dict(model_type="full", learning_rate=1e-4, max_train_steps=4, checkpointing_steps=2,
                   disable_validation=True, fuse_qkv_projections=True, images=6)
    straight = write_run(tmp_path / "straight", model, "sd1x", **options)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    dataset = tmp_path / "straight" / "dataset"
    checkpoint = tmp_path / "straight" / "output" / "checkpoints" / "step-000002"

    resumed = write_run(tmp_path / "resumed", model, "sd1x", dataset=dataset, resume_from_checkpoint="latest",
                        **options)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "output" / "checkpoints" / checkpoint.name)
    assert main(["train", str(resumed)]) == 0
    assert metrics(tmp_path / "resumed" / "output") == {step: full[step] for step in (3, 4)}
    weights = [DiffusionPipeline.from_pretrained(tmp_path / run / "output" / "pipeline").unet.state_dict()
               for run in ("straight", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    unfused = write_run(tmp_path / "unfused", model, "sd1x", dataset=dataset, resume_from_checkpoint="latest",
                        **{**options, "fuse_qkv_projections": False})
    shutil.copytree(checkpoint, tmp_path / "unfused" / "output" / "checkpoints" / checkpoint.name)
    capsys.readouterr()
    assert main(["train", str(unfused)]) == 2
    assert "fuse_qkv_projections: checkpoint has True, this run None" in capsys.readouterr().err
