"""Two-stage experts: refiner_training restricts the sampled timesteps (sigmas, for flow matching) to the
expert's share of the schedule (SimpleTuner's refiner_training_strength / _invert_schedule)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.config.schema import TrainingConfig


def _cfg(model: Path, family: str, **options) -> TrainingConfig:
    return TrainingConfig(model_family=family, pretrained_model_name_or_path=str(model), output_dir="unused",
                          base_model_default_dtype="fp32", **options)


def _timesteps(family_name: str, model: Path, draws: int = 4000, **options) -> torch.Tensor:
    from simpletuner.models.registry import get_family

    family = get_family(family_name)
    cfg = _cfg(model, family_name, **options)
    components = family.load(cfg)
    objective = family.objective(cfg, components)
    latents = torch.zeros(draws, 4, 4, 4)
    return objective.draw(latents, torch.Generator().manual_seed(0)).timesteps.float()


@pytest.mark.parametrize("tiny,family", [("sdxl", "sdxl"), ("pixart_sigma", "pixart_sigma")])
def test_timestep_histogram_covers_exactly_the_experts_range(tiny_model, tiny: str, family: str) -> None:
    model = tiny_model(tiny)
    everything = _timesteps(family, model)
    assert everything.max() >= 900 and everything.min() < 100  # without refiner_training: the whole schedule
    refiner = _timesteps(family, model, refiner_training=True, refiner_training_strength=0.3)
    histogram = torch.histc(refiner, bins=10, min=0, max=1000)
    assert histogram[3:].sum() == 0 and (histogram[:3] > 0).all(), histogram  # timesteps 0-299, all reached
    assert refiner.max() == 299 and refiner.min() == 0
    base = _timesteps(family, model, refiner_training=True, refiner_training_strength=0.3,
                      refiner_training_invert_schedule=True)
    histogram = torch.histc(base, bins=10, min=0, max=1000)
    assert histogram[:3].sum() == 0 and (histogram[3:] > 0).all(), histogram  # timesteps 300-999
    assert base.min() == 300 and base.max() == 999


def test_flow_matching_sigmas_stay_in_the_experts_range(tiny_model) -> None:
    sigmas = _timesteps("flux", tiny_model("flux"), refiner_training=True, refiner_training_strength=0.25) / 1000
    assert sigmas.max() <= 0.25 and sigmas.max() > 0.2 and sigmas.min() < 0.05
    inverted = _timesteps("flux", tiny_model("flux"), refiner_training=True, refiner_training_strength=0.25,
                          refiner_training_invert_schedule=True) / 1000
    assert inverted.min() >= 0.25 and inverted.max() > 0.9


@pytest.mark.slow
def test_expert_run_trains_and_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    """A first-stage PixArt expert (the high-noise 65%): trains, validates, and resumes exactly."""
    model = tiny_model("pixart_sigma")
    options = {"refiner_training": True, "refiner_training_strength": 0.35, "refiner_training_invert_schedule": True,
               "tokenizer_max_length": 32, "max_train_steps": 4, "checkpointing_steps": 2, "validation_steps": 4}
    straight = write_run(tmp_path / "straight", model, "pixart_sigma", **options)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    assert sorted(full) == [1, 2, 3, 4]
    assert list((tmp_path / "straight" / "output" / "validation" / "step-4").glob("*.png"))

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "pixart_sigma", dataset=tmp_path / "straight" / "dataset",
                        resume_from_checkpoint="latest", **{**options, "validation_steps": 100})
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    assert main(["train", str(resumed)]) == 0
    second = metrics(resumed_root / "output")
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)


@pytest.mark.parametrize("strength", ["1.0", "0", "1.5"])
def test_strength_outside_zero_one_is_refused(tmp_path: Path, tiny_model, capsys, strength: str) -> None:
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", refiner_training=True)
    assert main(["train", str(config), f"--refiner_training_strength={strength}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refiner_training_strength" in err and strength in err
