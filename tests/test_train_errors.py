"""Bad input to `simpletuner train`: a clear message, exit code 2, before long work, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_helpers import write_run

from simpletuner.cli import main


def _fails(capsys, config: Path, *overrides: str) -> str:
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _nothing_written(root: Path) -> None:
    output = root / "output"
    assert not (output / "checkpoints").exists()
    assert not (output / "pytorch_lora_weights.safetensors").exists()


def test_model_folder_without_a_component(tmp_path, tiny_model, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd1x"), model)
    shutil.rmtree(model / "unet")
    err = _fails(capsys, write_run(tmp_path, model, "sd1x"))
    assert str(model) in err and "unet" in err
    _nothing_written(tmp_path)


def test_family_that_does_not_match_the_model(tmp_path, tiny_model, capsys):
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sdxl"))
    assert "StableDiffusionPipeline" in err and "model_family 'sdxl'" in err
    _nothing_written(tmp_path)


def test_resolution_the_family_cannot_take(tmp_path, tiny_model, capsys):
    err = _fails(capsys, write_run(tmp_path, tiny_model("sdxl"), "sdxl", validation_resolution="96x50"))
    assert "96x50" in err and "64" in err
    _nothing_written(tmp_path)


def test_empty_dataset(tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=empty))
    assert "shapes" in err and str(empty) in err
    _nothing_written(tmp_path)


def test_unwritable_output_dir(tmp_path, tiny_model, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sd1x", output_dir=str(blocker / "out")))
    assert "output_dir" in err and "not writable" in err


@pytest.mark.slow
def test_checkpoint_of_another_configuration(tmp_path, tiny_model, capsys):
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", max_train_steps=2, disable_validation=True)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    checkpoints = sorted((tmp_path / "output" / "checkpoints").iterdir())
    err = _fails(capsys, config, "--lora_rank", "8", "--resume_from_checkpoint", "latest", "--max_train_steps", "4")
    assert "different configuration" in err and "lora_rank" in err
    assert sorted((tmp_path / "output" / "checkpoints").iterdir()) == checkpoints


@pytest.mark.parametrize("option", [["--train_text_encoder", "true"],
                                    ["--base_model_precision", "int8-quanto"], ["--push_to_hub", "true"]])
def test_options_of_features_not_built_yet_are_refused_not_ignored(tmp_path, tiny_model, capsys, option):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x")
    err = _fails(capsys, config, *option)
    assert option[0].lstrip("-") in err and "not implemented in this version yet" in err
    assert main(["config", "check", str(config), *option]) == 2
    assert option[0].lstrip("-") in capsys.readouterr().err
    _nothing_written(tmp_path)
