"""Every family of the mission trains through `simpletuner train` (LoRA and full) on its tiny model,
and its output loads into the matching diffusers pipeline and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.testing.tiny import sample_kwargs

pytestmark = pytest.mark.slow

# tiny family -> (model_family, model_type for LoRA, model_type for full, training resolution)
FAMILIES = {
    "sd3": ("sd3", "lora", "full", 32),
    "flux": ("flux", "lora", "full", 32),
    "pixart_sigma": ("pixart_sigma", "lora", "full", 32),
    "kolors": ("kolors", "lora", "full", 64),
    "hunyuan_dit": ("hunyuan_dit", "lora", "full", 32),
    "deepfloyd_if": ("deepfloyd", "deepfloyd-lora", "deepfloyd-full", 32),
    "deepfloyd_if_stage2": ("deepfloyd", "deepfloyd-stage2-lora", "deepfloyd-stage2", 64),
}


def _sample(pipeline, tiny: str) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(**sample_kwargs(tiny), output_type="np", generator=torch.Generator().manual_seed(0)).images


# families whose text lengths the model fixes (Hunyuan-DiT's transformer takes exactly 77 + 256 tokens)
FIXED_TEXT_LENGTH = {"hunyuan_dit"}
# families whose pipeline has no LoRA loader: the adapter is peft's format
PEFT_LORA = {"pixart_sigma", "hunyuan_dit"}


def _train(tmp_path: Path, tiny_model, tiny: str, lora: bool) -> Path:
    model_family, lora_type, full_type, resolution = FAMILIES[tiny]
    text_length = {} if tiny in FIXED_TEXT_LENGTH else {"tokenizer_max_length": 32}
    config = write_run(tmp_path, tiny_model(tiny), tiny, model_family=model_family,
                       model_type=lora_type if lora else full_type, resolution=resolution,
                       validation_resolution=str(resolution), max_train_steps=2, checkpointing_steps=2,
                       validation_steps=2, learning_rate=1e-3 if lora else 1e-4, **text_length)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    losses = metrics(output)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    assert list((output / "validation" / "step-0").glob("*.png")), "no base-model validation image"
    assert list((output / "validation" / "step-2").glob("*.png")), "no validation image after training"
    return output


@pytest.mark.parametrize("tiny", list(FAMILIES))
def test_lora(tmp_path: Path, tiny_model, tiny: str) -> None:
    from diffusers import DiffusionPipeline

    output = _train(tmp_path, tiny_model, tiny, lora=True)
    pipeline = DiffusionPipeline.from_pretrained(tiny_model(tiny))
    before = _sample(pipeline, tiny)
    if tiny in PEFT_LORA:
        from peft import PeftModel

        pipeline.transformer = PeftModel.from_pretrained(pipeline.transformer, output)
    else:
        pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    after = _sample(pipeline, tiny)
    assert np.isfinite(after).all()
    assert not np.array_equal(before, after), "the trained adapter did not change the output"


@pytest.mark.parametrize("tiny", list(FAMILIES))
def test_full(tmp_path: Path, tiny_model, tiny: str) -> None:
    from diffusers import DiffusionPipeline

    output = _train(tmp_path, tiny_model, tiny, lora=False)
    trained = DiffusionPipeline.from_pretrained(output / "pipeline")
    original = DiffusionPipeline.from_pretrained(tiny_model(tiny))
    assert type(trained) is type(original)
    assert np.isfinite(_sample(trained, tiny)).all()
    name = "transformer" if hasattr(original, "transformer") else "unet"
    new = dict(getattr(trained, name).named_parameters())
    assert any(not torch.equal(p, new[key]) for key, p in getattr(original, name).named_parameters())
