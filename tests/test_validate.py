"""Validation: prompt libraries, resolutions, scheduler choice, PNGs on disk."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.models.registry import get_family
from simpletuner.validate import parse_resolutions, run_validation, validation_plan


def test_parse_resolutions():
    assert parse_resolutions("64", 8) == [(64, 64)]
    assert parse_resolutions("64x32, 32x64", 8) == [(64, 32), (32, 64)]
    with pytest.raises(ConfigError, match="multiple of 64"):
        parse_resolutions("96", 64)
    with pytest.raises(ConfigError, match="'big'"):
        parse_resolutions("big", 8)


def _config(model, tmp_path, **options) -> TrainingConfig:
    return TrainingConfig(model_family="sd1x", pretrained_model_name_or_path=str(model), output_dir=str(tmp_path),
                          base_model_default_dtype="fp32", vae_dtype="fp32", validation_num_inference_steps=2,
                          **options)


def test_prompt_library_resolutions_and_scheduler(tmp_path, tiny_model):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"red circle": "a red circle", "blue/square": "a blue square"}))
    cfg = _config(tiny_model("sd1x"), tmp_path, user_prompt_library=str(library), validation_resolution="32,48x32",
                  validation_noise_scheduler="euler", num_validation_images=2)
    family = get_family("sd1x")
    plan = validation_plan(cfg, family)
    assert plan.prompts == {"red_circle": "a red circle", "blue_square": "a blue square"}
    components = family.load(cfg)
    assert type(family.pipeline(components).scheduler).__name__ == "EulerDiscreteScheduler"
    files = run_validation(plan, family, components, cfg, step=3)
    names = sorted(path.name for path in files)
    assert names == sorted(f"{prompt}-{size}-{index}.png" for prompt in ("red_circle", "blue_square")
                           for size in ("32x32", "48x32") for index in (0, 1))
    assert all(path.parent == tmp_path / "validation" / "step-3" for path in files)
    assert Image.open(tmp_path / "validation" / "step-3" / "red_circle-48x32-0.png").size == (48, 32)


def test_no_prompt_or_disabled_means_no_validation(tmp_path, tiny_model):
    family = get_family("sd1x")
    assert validation_plan(_config(tiny_model("sd1x"), tmp_path), family) is None
    assert validation_plan(_config(tiny_model("sd1x"), tmp_path, validation_prompt="x", disable_validation=True),
                           family) is None


def test_unreadable_prompt_library(tmp_path, tiny_model):
    bad = tmp_path / "prompts.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="name -> prompt"):
        validation_plan(_config(tiny_model("sd1x"), tmp_path, user_prompt_library=str(bad)), get_family("sd1x"))
