"""The model card's text for every kind of output: front matter that huggingface_hub reads, loading code
that is valid Python, the base model's license from its local card."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from simpletuner.publish.card import CardImage, CardInfo, DatasetLine, base_license, copy_card_images, render_card
from simpletuner.publish.metadata import TrainingSummary


def _info(kind: str, **changes) -> CardInfo:
    lora = kind in ("lora", "peft")
    summary = TrainingSummary(base_model="org/base", family="flux", architecture="flux-1-dev", title="my run",
                              resolution=512, steps=100, adapter="lora" if lora else kind,
                              rank=16 if lora else None, alpha=8.0 if lora else None, trigger_words=("sks dog",))
    files = {"lora": ("pytorch_lora_weights.safetensors",), "peft": ("adapter_model.safetensors",),
             "lycoris": ("pytorch_lora_weights.safetensors",), "full": ("pipeline",)}[kind]
    values = dict(summary=summary, pipeline_class="FluxPipeline", output_kind=kind, output_files=files,
                  folder_name="output", learning_rate=1e-4, datasets=(DatasetLine("dogs", 20, ("512x512",)),),
                  images=(CardImage("images/step-100-validation-512x512-0.png", "a sks dog", 100),))
    values.update(changes)
    return CardInfo(**values)


def _code(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("kind, expected", [
    ("lora", "pipeline.load_lora_weights('me/run', weight_name='pytorch_lora_weights.safetensors')"),
    ("peft", "pipeline.transformer = PeftModel.from_pretrained(pipeline.transformer, 'me/run')"),
    ("lycoris", "weights = hf_hub_download('me/run', 'pytorch_lora_weights.safetensors')"),
    ("full", "DiffusionPipeline.from_pretrained('me/run', dtype=torch.bfloat16)"),
])
def test_each_output_kind_gets_its_own_loading_code(kind: str, expected: str) -> None:
    text = render_card(_info(kind, hub_model_id="me/run"))
    code = _code(text)
    compile(code, "card", "exec")
    assert expected in code
    assert ("ComfyUI" in text) == (kind in ("lora", "peft"))
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "org/base" and data["instance_prompt"] == "sks dog"
    assert "license" not in data  # unknown for a Hub base that is not fetched


def test_a_local_copy_is_loaded_by_its_folder_name_and_the_card_flags(tmp_path: Path) -> None:
    text = render_card(_info("full", safe_for_work=True, note="Made for tests.", license="apache-2.0"))
    assert "DiffusionPipeline.from_pretrained('path/to/output/pipeline'" in text
    data = ModelCard(text).data.to_dict()
    assert "not-for-all-audiences" not in data["tags"] and data["license"] == "apache-2.0"
    assert "Made for tests." in text and "| Rank / alpha |" not in text
    ui = render_card(_info("lora", output_files=("pytorch_lora_weights.safetensors", "my-run.safetensors")))
    assert "The file `my-run.safetensors` holds the LoRA" in ui and "<lora:my-run:1>" in ui


def test_the_license_comes_from_a_local_base_models_card(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: openrail++\ntags: [x]\n---\n# base\n")
    assert base_license(str(tmp_path)) == "openrail++"
    assert base_license(str(tmp_path / "missing")) is None
    assert base_license("org/some-hub-model") is None


def test_card_images_are_copied_with_their_prompts(tmp_path: Path) -> None:
    validation = tmp_path / "validation"
    for step in (0, 50, 100):
        (validation / f"step-{step}").mkdir(parents=True)
        (validation / f"step-{step}" / "dog-512x512-0.png").write_bytes(f"png {step}".encode())
    images = {step: [validation / f"step-{step}" / "dog-512x512-0.png"] for step in (0, 50, 100)}
    shown = copy_card_images(tmp_path, images, {"dog": "a sks dog"})
    assert [(i.file, i.prompt, i.step) for i in shown] == [
        ("images/step-100-dog-512x512-0.png", "a sks dog", 100), ("images/step-0-dog-512x512-0.png", "a sks dog", 0)]
    assert (tmp_path / "images" / "step-100-dog-512x512-0.png").read_bytes() == b"png 100"
