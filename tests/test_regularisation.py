"""Regularisation data (is_regularisation_data): the target is the base model's own prediction, adapter off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import metrics, write_run

from simpletuner.cli import main


@pytest.fixture(scope="module")
def lora_unet(tiny_model):
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.registry import get_family
    from simpletuner.train.adapters import prepare_trainable

    cfg = TrainingConfig(model_family="sd1x", pretrained_model_name_or_path=str(tiny_model("sd1x")),
                         output_dir="unused", base_model_default_dtype="fp32", lora_rank=4)
    family = get_family("sd1x")
    components = family.load(cfg)
    trained = prepare_trainable(family.denoiser(components), cfg, family.adapter_targets(cfg))
    return family, components, family.objective(cfg, components), trained


def _batch(family, components, regularisation):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(len(regularisation), 4, 4, 4, generator=generator)
    text = family.text_outputs(components, ["a red circle", "a blue square"][:len(regularisation)])
    return {"latents": latents, "text": text, "regularisation": regularisation}, generator


def test_regularisation_loss_is_the_adapters_deviation_from_the_base(lora_unet) -> None:
    from simpletuner.models.objectives import training_loss

    family, components, objective, trained = lora_unet
    batch, generator = _batch(family, components, [True, True])
    draw = objective.draw(batch["latents"], generator)
    # step 0: LoRA B is zero, so the adapted model is the base model: nothing to learn
    assert training_loss(family, components, objective, batch, draw, trained.base_model).item() == 0.0

    lora_b = [p for name, p in trained.model.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for parameter in lora_b:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        loss = training_loss(family, components, objective, batch, draw, trained.base_model)
        noisy = objective.noisy_latents(batch["latents"], draw)
        with torch.no_grad():
            adapted = family.predict(components, noisy, draw.timesteps, batch["text"], batch)
            trained.model.disable_adapters()
            base = family.predict(components, noisy, draw.timesteps, batch["text"], batch)
            trained.model.enable_adapters()
        expected = F.mse_loss(adapted.float(), base.float())
        assert expected > 0
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)

        # a training sample beside it keeps its usual target (the noise, for epsilon prediction)
        mixed, generator = _batch(family, components, [True, False])
        draw = objective.draw(mixed["latents"], generator)
        loss = training_loss(family, components, objective, mixed, draw, trained.base_model)
        noisy = objective.noisy_latents(mixed["latents"], draw)
        with torch.no_grad():
            adapted = family.predict(components, noisy, draw.timesteps, mixed["text"], mixed)
            with trained.base_model():
                base = family.predict(components, noisy, draw.timesteps, mixed["text"], mixed)
        expected = (F.mse_loss(adapted[0].float(), base[0].float()) + F.mse_loss(adapted[1].float(),
                                                                                  draw.noise[1].float())) / 2
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    finally:
        with torch.no_grad():
            for parameter, value in zip(lora_b, saved):
                parameter.copy_(value)


def test_adapter_is_back_on_after_the_base_prediction(lora_unet) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    family, components, objective, trained = lora_unet
    layers = [module for module in trained.model.modules() if isinstance(module, BaseTunerLayer)]
    with trained.base_model():
        assert layers and all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)


def _regularisation_run(root: Path, model: Path, *, only: bool = False, **options) -> Path:
    config = write_run(root, model, "sd1x", images=6, disable_validation=True, **options)
    backends = json.loads((root / "multidatabackend.json").read_text())
    regularisation = {**backends[0], "id": "prior", "is_regularisation_data": True}
    backends = [regularisation, backends[1]] if only else [backends[0], regularisation, backends[1]]
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


@pytest.mark.slow
def test_regularisation_only_run_learns_nothing(tmp_path: Path, tiny_model) -> None:
    """Every batch is regularisation: the adapted model already equals the base, so every loss is 0."""
    config = _regularisation_run(tmp_path, tiny_model("sd1x"), only=True, max_train_steps=3)
    assert main(["train", str(config)]) == 0
    assert set(metrics(tmp_path / "output").values()) == {0.0}


@pytest.mark.slow
def test_mixed_regularisation_run_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    straight = _regularisation_run(tmp_path / "straight", model, max_train_steps=6, checkpointing_steps=3)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    assert 0.0 in full.values() and any(loss > 0 for loss in full.values())  # both kinds of batch were seen

    resumed_root = tmp_path / "resumed"
    resumed = _regularisation_run(resumed_root, model, dataset=tmp_path / "straight" / "dataset", max_train_steps=6,
                                  checkpointing_steps=3, resume_from_checkpoint="latest")
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000003",
                    resumed_root / "output" / "checkpoints" / "step-000003")
    assert main(["train", str(resumed)]) == 0
    second = metrics(resumed_root / "output")
    assert sorted(second) == [4, 5, 6] and all(second[step] == full[step] for step in (4, 5, 6)), (second, full)


def test_regularisation_data_in_full_training_is_refused_naming_both(tmp_path: Path, tiny_model, capsys) -> None:
    config = _regularisation_run(tmp_path, tiny_model("sd1x"), model_type="full")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "'prior'" in err and "is_regularisation_data" in err and "model_type" in err and "'full'" in err


def test_regularisation_data_with_text_encoder_training_is_refused_naming_both(tmp_path: Path, tiny_model,
                                                                              capsys) -> None:
    config = _regularisation_run(tmp_path, tiny_model("sd1x"), train_text_encoder=True)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is_regularisation_data" in err and "train_text_encoder" in err
