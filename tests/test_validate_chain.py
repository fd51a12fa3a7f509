"""Validation chaining two experts (validation_base_model / validation_refiner_model) with tiny SDXL stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import write_run

from simpletuner.cli import main


def _timesteps_of(unet, seen: list[int]):
    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(int(torch.as_tensor(timestep).flatten()[0]))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("trained_first", [True, False], ids=["trained-base", "trained-refiner"])
def test_first_stage_runs_to_the_split_and_the_second_from_there(tiny_model, trained_first: bool) -> None:
    """The first stage denoises the noisy timesteps down to the split (1 - refiner_training_strength), the second
    the rest: together they are the whole schedule of validation_num_inference_steps, each step once."""
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.validate_chain import StageChain

    base_path, refiner_path = tiny_model("sdxl"), tiny_model("sdxl_refiner")
    other = {"validation_refiner_model": str(refiner_path)} if trained_first else {
        "validation_base_model": str(base_path), "refiner_training": True}
    cfg = TrainingConfig(model_family="sdxl",
                         pretrained_model_name_or_path=str(base_path if trained_first else refiner_path),
                         output_dir="unused", refiner_training_strength=0.3, validation_num_inference_steps=10,
                         **other)
    chain = StageChain.from_config(cfg)
    trained = DiffusionPipeline.from_pretrained(base_path if trained_first else refiner_path, add_watermarker=False)
    trained.set_progress_bar_config(disable=True)
    loaded = chain.other(torch.device("cpu"), torch.float32)
    first_unet, second_unet = (trained.unet, loaded.unet) if trained_first else (loaded.unet, trained.unet)
    first, second = [], []
    hooks = [_timesteps_of(first_unet, first), _timesteps_of(second_unet, second)]
    try:
        images = chain.sample(trained, cfg, "a red circle", 32, 32, torch.Generator().manual_seed(0),
                              torch.device("cpu"), torch.float32)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(images) == 1 and images[0].size == (32, 32)

    schedule = type(trained.scheduler).from_config(trained.scheduler.config)
    schedule.set_timesteps(10)
    whole = [int(t) for t in schedule.timesteps]
    cutoff = round(1000 - 0.7 * 1000)  # diffusers' discrete_timestep_cutoff for denoising_end = 0.7
    assert first and second
    assert all(t >= cutoff for t in first) and all(t < cutoff for t in second), (first, second)
    assert sorted(set(first) | set(second), reverse=True) == whole and len(set(first)) + len(set(second)) == 10


def _chained_run(root: Path, model: Path, family: str, **options) -> Path:
    return write_run(root, model, family, images=4, max_train_steps=1, checkpointing_steps=1, validation_steps=1,
                     **options)


def _image(output: Path, step: int) -> np.ndarray:
    (path,) = sorted((output / "validation" / f"step-{step}").glob("*.png"))
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_trained_base_validates_through_the_given_refiner(tmp_path: Path, tiny_model) -> None:
    base, refiner = tiny_model("sdxl"), tiny_model("sdxl_refiner")
    plain = _chained_run(tmp_path / "plain", base, "sdxl")
    assert main(["train", str(plain)]) == 0
    chained = _chained_run(tmp_path / "chained", base, "sdxl", dataset=tmp_path / "plain" / "dataset",
                           validation_refiner_model=str(refiner))
    assert main(["train", str(chained)]) == 0
    for step in (0, 1):  # the refiner finished the last 20% of the schedule: other pixels than the base alone
        assert np.abs(_image(tmp_path / "chained" / "output", step)
                      - _image(tmp_path / "plain" / "output", step)).max() > 0


@pytest.mark.slow
def test_trained_refiner_validates_after_the_given_base(tmp_path: Path, tiny_model) -> None:
    base, refiner = tiny_model("sdxl"), tiny_model("sdxl_refiner")
    config = _chained_run(tmp_path, refiner, "sdxl_refiner", refiner_training=True,
                          validation_base_model=str(base))
    assert main(["train", str(config)]) == 0
    assert _image(tmp_path / "output", 1).shape[:2] == (64, 64)


@pytest.mark.parametrize(("family", "options", "named"), [
    ("pixart_sigma", {"validation_refiner_model": "x"}, ["validation_refiner_model", "'pixart_sigma'"]),
    ("sdxl", {"validation_refiner_model": "x", "validation_base_model": "y", "refiner_training": True},
     ["validation_base_model", "validation_refiner_model"]),
    ("sdxl", {"validation_base_model": "y"}, ["validation_base_model", "refiner_training"]),
    ("sdxl", {"validation_refiner_model": "x", "refiner_training": True},
     ["validation_refiner_model", "refiner_training"]),
])
def test_impossible_chains_are_refused_naming_both_options(tmp_path: Path, tiny_model, capsys, family, options,
                                                           named) -> None:
    config = write_run(tmp_path, tiny_model("sdxl"), "sdxl", **options)
    data = json.loads(config.read_text())
    data["model_family"] = family
    config.write_text(json.dumps(data))
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(name in err for name in named), err


def test_kolors_stages_chain_too(tiny_model) -> None:
    """Kolors' pipelines have denoising_end / denoising_start: a trained Kolors base is finished by a given one."""
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.validate_chain import StageChain

    path = tiny_model("kolors")
    cfg = TrainingConfig(model_family="kolors", pretrained_model_name_or_path=str(path), output_dir="unused",
                         validation_refiner_model=str(path), validation_num_inference_steps=5)
    chain = StageChain.from_config(cfg)
    trained = DiffusionPipeline.from_pretrained(path)
    trained.set_progress_bar_config(disable=True)
    first, second = [], []
    hooks = [_timesteps_of(trained.unet, first),
             _timesteps_of(chain.other(torch.device("cpu"), torch.float32).unet, second)]
    try:
        (image,) = chain.sample(trained, cfg, "a red circle", 32, 32, torch.Generator().manual_seed(0),
                                torch.device("cpu"), torch.float32)
    finally:
        for hook in hooks:
            hook.remove()
    assert image.size == (32, 32)
    assert first and second and min(first) > max(second) and len(set(first)) + len(set(second)) == 5


@pytest.mark.slow
def test_a_refiner_cannot_be_the_first_stage(tmp_path: Path, tiny_model, capsys) -> None:
    """A trained SDXL refiner (recognised when it loads) with validation_refiner_model: refused at the first
    validation, before any step, naming the option."""
    config = _chained_run(tmp_path, tiny_model("sdxl_refiner"), "sdxl_refiner",
                          validation_refiner_model=str(tiny_model("sdxl_refiner")))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "validation_refiner_model" in err and "first stage" in err, err
    assert not (tmp_path / "output" / "metrics.jsonl").exists() or "loss" not in (
        tmp_path / "output" / "metrics.jsonl").read_text()
