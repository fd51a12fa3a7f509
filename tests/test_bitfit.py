"""BitFit (layer_freeze_strategy=bitfit, upstream's use_bitfit): only biases train; the output is a full pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import metrics, write_run

from simpletuner.cli import main

OPTIONS = {"model_type": "full", "use_bitfit": True, "learning_rate": 1e-2, "disable_validation": True}


@pytest.mark.slow
def test_bitfit_changes_only_biases_and_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    from diffusers import DiffusionPipeline

    model = tiny_model("sd1x")
    straight = write_run(tmp_path / "straight", model, "sd1x", max_train_steps=4, checkpointing_steps=2, **OPTIONS)
    assert main(["train", str(straight)]) == 0
    trained = DiffusionPipeline.from_pretrained(tmp_path / "straight" / "output" / "pipeline")
    original = dict(DiffusionPipeline.from_pretrained(model).unet.named_parameters())
    changed = {name for name, p in trained.unet.named_parameters() if not torch.equal(p, original[name])}
    assert changed, "BitFit changed nothing"
    assert all(name.endswith(".bias") for name in changed), sorted(changed)[:5]

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=tmp_path / "straight" / "dataset", max_train_steps=4,
                        checkpointing_steps=2, resume_from_checkpoint="latest", **OPTIONS)
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    assert main(["train", str(resumed)]) == 0
    full, second = metrics(tmp_path / "straight" / "output"), metrics(resumed_root / "output")
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)
    again = dict(DiffusionPipeline.from_pretrained(resumed_root / "output" / "pipeline").unet.named_parameters())
    assert all(torch.equal(p, again[name]) for name, p in trained.unet.named_parameters())


def test_bitfit_with_lora_is_refused_naming_both(tmp_path: Path, tiny_model, capsys) -> None:
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", use_bitfit=True)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "bitfit" in err and "model_type" in err and "'lora'" in err


def test_bitfit_freezes_everything_but_biases() -> None:
    from torch import nn

    from simpletuner.train.adapters import freeze_all_but_biases

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    freeze_all_but_biases(model)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"0.bias", "1.bias"}
