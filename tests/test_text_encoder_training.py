"""train_text_encoder: the text encoders train beside the UNet (LoRA or full), their outputs come from the
step, and the outputs hold them: diffusers loads them and the prompt's image changes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow


def _prompt_embeds(pipeline, prompt: str = "a red circle on a blue background") -> torch.Tensor:
    tokens = pipeline.tokenizer([prompt], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipeline.text_encoder(tokens.input_ids)[0]


def _sample(pipeline, size: int) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("a red circle on a blue background", num_inference_steps=2, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_lora_on_the_text_encoders_loads_in_diffusers_and_changes_the_text(tmp_path: Path, tiny_model,
                                                                            family: str) -> None:
    from diffusers import DiffusionPipeline

    model = tiny_model(family)
    config = write_run(tmp_path, model, family, train_text_encoder=True, disable_validation=True,
                       learning_rate=1e-2)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    weights = load_file(output / "pytorch_lora_weights.safetensors")
    components = {key.split(".", 1)[0] for key in weights}
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert components == expected, components
    assert any(key.startswith("text_encoder.") and "lora_B" in key and torch.count_nonzero(value)
               for key, value in weights.items()), "the text encoder's LoRA did not train"

    pipeline = DiffusionPipeline.from_pretrained(model)
    if family == "sdxl":
        pipeline.watermark = None
    size = 64 if family == "sdxl" else 32
    text_before, image_before = _prompt_embeds(pipeline), _sample(pipeline, size)
    pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(_prompt_embeds(pipeline), text_before), "the loaded LoRA left the text unchanged"
    # the text encoder's adapter alone changes the image: the UNet's LoRA switched off
    pipeline.set_adapters(["default_0"], adapter_weights=[1.0])
    pipeline.unet.disable_adapters()
    image_after = _sample(pipeline, size)
    assert torch.isfinite(image_after).all() and not torch.equal(image_before, image_after)

    # `simpletuner export --format merged` fuses the text encoders' LoRA too
    assert main(["export", str(output), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    with_lora = DiffusionPipeline.from_pretrained(model)
    with_lora.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_prompt_embeds(merged), _prompt_embeds(with_lora), rtol=1e-4, atol=1e-5)


def test_full_text_encoder_training_exports_it_and_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    from diffusers import DiffusionPipeline

    model = tiny_model("sd1x")
    options = {"model_type": "full", "train_text_encoder": True, "learning_rate": 1e-3, "disable_validation": True,
               "max_train_steps": 4, "checkpointing_steps": 2}
    straight = write_run(tmp_path / "straight", model, "sd1x", **options)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    trained = DiffusionPipeline.from_pretrained(tmp_path / "straight" / "output" / "pipeline")
    original = DiffusionPipeline.from_pretrained(model)
    assert not torch.allclose(_prompt_embeds(trained), _prompt_embeds(original)), "the text encoder did not train"
    assert (tmp_path / "straight" / "output" / "checkpoints" / "step-000002" / "text_encoder.safetensors").is_file()

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=tmp_path / "straight" / "dataset",
                        resume_from_checkpoint="latest", **options)
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    assert main(["train", str(resumed)]) == 0
    second = metrics(resumed_root / "output")
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)
    again = DiffusionPipeline.from_pretrained(resumed_root / "output" / "pipeline")
    assert torch.equal(_prompt_embeds(again), _prompt_embeds(trained))


def test_kolors_text_encoder_lora_in_the_ui_file_is_refused_naming_both(tmp_path: Path, tiny_model, capsys) -> None:
    config = write_run(tmp_path, tiny_model("kolors"), "kolors", resolution=64, train_text_encoder=True)
    assert main(["train", str(config)]) == 2  # the default lora_format writes the UI file too
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train_text_encoder" in err and "'kolors'" in err and "lora_format" in err


@pytest.mark.parametrize("strategy,frozen", [("before", {0}), ("after", {2, 3}), ("outside", {1}),
                                             ("between", {0, 2, 3})])
def test_layer_freezing_follows_simpletuners_strategies(tiny_model, strategy: str, frozen: set[int]) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner.train.text_encoders import freeze_layers

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                                           num_attention_heads=2, vocab_size=50, max_position_embeddings=8))
    encoder.requires_grad_(True)
    # before=1, after=1: before freezes layer 0, after freezes 2-3, outside freezes 1, between 0 and 2-3
    freeze_layers(encoder, strategy, before=1, after=1)
    layers = 0
    for name, parameter in encoder.named_parameters():
        match = re.search(r"(^|\.)encoder\.layers\.(\d+)\.", name)
        if match:
            layers += 1
            assert parameter.requires_grad == (int(match.group(2)) not in frozen), name
        else:
            assert parameter.requires_grad, name  # embeddings and the final norm keep training
    assert layers > 0


def test_text_encoder_lr_gives_the_encoders_their_own_group() -> None:
    from torch import nn

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.train.optim import build_optimizer

    unet, encoder = nn.Linear(3, 3), nn.Linear(3, 3)
    cfg = TrainingConfig(model_family="sd1x", pretrained_model_name_or_path="x", output_dir="x", optimizer="adamw",
                         learning_rate=1e-4, text_encoder_lr=5e-6)
    optimizer = build_optimizer([*unet.parameters(), *encoder.parameters()], cfg, "cpu",
                                text_encoder_params=list(encoder.parameters()))
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(lrs[id(p)] == 1e-4 for p in unet.parameters())
    assert all(lrs[id(p)] == 5e-6 for p in encoder.parameters())


def test_text_encoder_lora_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    options = {"train_text_encoder": True, "text_encoder_lr": 5e-3, "caption_dropout_probability": 0.3,
               "disable_validation": True, "max_train_steps": 4, "checkpointing_steps": 2}
    straight = write_run(tmp_path / "straight", model, "sd1x", **options)
    assert main(["train", str(straight)]) == 0
    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=tmp_path / "straight" / "dataset",
                        resume_from_checkpoint="latest", **options)
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    assert main(["train", str(resumed)]) == 0
    full, second = metrics(tmp_path / "straight" / "output"), metrics(resumed_root / "output")
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in final_a)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
