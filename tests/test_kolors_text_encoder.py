"""train_text_encoder on Kolors: ChatGLM trains (LoRA on its attention, or full), its outputs come from the
step, and diffusers' KolorsPipeline loads the result: the prompt's text and image change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, resumed_losses, write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"


def _prompt_embeds(pipeline) -> torch.Tensor:
    with torch.no_grad():
        embeds, *_ = pipeline.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
    return embeds


def _sample(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def _run(root: Path, model: Path, **options) -> Path:
    options.setdefault("learning_rate", 1e-2)
    return write_run(root, model, "kolors", resolution=64, train_text_encoder=True, disable_validation=True,
                     **options)


def test_chatglm_lora_loads_in_kolors_pipeline_changes_the_text_and_resumes_exactly(tmp_path: Path,
                                                                                   tiny_model) -> None:
    from diffusers import KolorsPipeline

    model = tiny_model("kolors")
    options = {"lora_format": "diffusers", "max_train_steps": 4, "checkpointing_steps": 2}
    config = _run(tmp_path / "straight", model, **options)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "straight" / "output"
    weights = load_file(output / "pytorch_lora_weights.safetensors")
    assert {key.split(".", 1)[0] for key in weights} == {"unet", "text_encoder"}
    assert any(key.startswith("text_encoder.") and "query_key_value.lora_linear_layer.up" in key and torch.count_nonzero(value)
               for key, value in weights.items()), "ChatGLM's LoRA did not train"

    pipeline = KolorsPipeline.from_pretrained(model)
    text_before, image_before = _prompt_embeds(pipeline), _sample(pipeline)
    pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(_prompt_embeds(pipeline), text_before), "the loaded LoRA left the text unchanged"
    pipeline.unet.disable_adapters()  # ChatGLM's adapter alone changes the image
    image_after = _sample(pipeline)
    assert torch.isfinite(image_after).all() and not torch.equal(image_before, image_after)

    # `simpletuner export --format merged` reads ChatGLM's LoRA back and fuses it
    assert main(["export", str(output), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    with_lora = KolorsPipeline.from_pretrained(model)
    with_lora.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    merged = KolorsPipeline.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_prompt_embeds(merged), _prompt_embeds(with_lora), rtol=1e-4, atol=1e-5)

    resumed_root = tmp_path / "resumed"
    resumed = _run(resumed_root, model, dataset=tmp_path / "straight" / "dataset", resume_from_checkpoint="latest",
                   **options)
    full, second = metrics(output), resumed_losses(output / "checkpoints" / "step-000002", resumed)
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)
    again = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[key], weights[key]) for key in weights)


def test_full_chatglm_training_is_in_the_exported_pipeline(tmp_path: Path, tiny_model) -> None:
    from diffusers import KolorsPipeline

    model = tiny_model("kolors")
    config = _run(tmp_path, model, model_type="full", learning_rate=1e-3, max_train_steps=2, checkpointing_steps=2)
    assert main(["train", str(config)]) == 0
    trained = KolorsPipeline.from_pretrained(tmp_path / "output" / "pipeline")
    original = KolorsPipeline.from_pretrained(model)
    assert not torch.allclose(_prompt_embeds(trained), _prompt_embeds(original)), "ChatGLM did not train"
    assert torch.isfinite(_sample(trained)).all()
