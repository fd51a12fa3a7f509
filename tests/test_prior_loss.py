"""Classic DreamBooth prior preservation (is_class_data, prior_loss_weight): class images' loss is weighted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import metrics, resumed_losses, write_run

from simpletuner.cli import main


@pytest.fixture(scope="module")
def sd1x(tiny_model):
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.registry import get_family

    cfg = TrainingConfig(model_family="sd1x", pretrained_model_name_or_path=str(tiny_model("sd1x")),
                         output_dir="unused", base_model_default_dtype="fp32")
    family = get_family("sd1x")
    components = family.load(cfg)
    return family, components, family.objective(cfg, components)


def _batch(family, components, class_data):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(len(class_data), 4, 4, 4, generator=generator)
    prompts = ["a photo of sks dog", "a photo of sks dog", "a photo of a dog", "a photo of a dog"]
    text = family.text_outputs(components, prompts[:len(class_data)])
    return {"latents": latents, "text": text, "class_data": class_data}, generator


def test_loss_is_instance_loss_plus_weighted_class_loss_as_in_diffusers_dreambooth(sd1x) -> None:
    """diffusers' train_dreambooth_lora.py with prior preservation: the batch holds instance then class
    examples; model_pred and target are chunked in two; loss = mse(instance) + prior_loss_weight * mse(class)."""
    from simpletuner.models.objectives import training_loss

    family, components, objective = sd1x
    batch, generator = _batch(family, components, [False, False, True, True])
    draw = objective.draw(batch["latents"], generator)
    with torch.no_grad():
        loss = training_loss(family, components, objective, batch, draw, prior_loss_weight=0.3)
        plain = training_loss(family, components, objective, {**batch, "class_data": None}, draw)
        noisy = objective.noisy_latents(batch["latents"], draw)
        model_pred = family.predict(components, noisy, draw.timesteps, batch["text"], batch)
    target = draw.noise  # epsilon prediction
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    expected = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    expected = expected + 0.3 * prior_loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(loss, plain)  # the weight makes a difference here

    # a batch of class images only: prior_loss_weight times their loss
    only, generator = _batch(family, components, [True, True])
    draw = objective.draw(only["latents"], generator)
    with torch.no_grad():
        weighted = training_loss(family, components, objective, only, draw, prior_loss_weight=0.3)
        unweighted = training_loss(family, components, objective, {**only, "class_data": None}, draw)
    torch.testing.assert_close(weighted, 0.3 * unweighted, rtol=1e-6, atol=0)


def _class_run(root: Path, model: Path, *, only: bool = False, **options) -> Path:
    config = write_run(root, model, "sd1x", images=6, disable_validation=True, **options)
    backends = json.loads((root / "multidatabackend.json").read_text())
    # alone, the class dataset keeps the instance dataset's id: the same batches as a run without the flag
    class_images = {**backends[0], "id": "shapes" if only else "dogs", "is_class_data": True}
    backends = [class_images, backends[1]] if only else [backends[0], class_images, backends[1]]
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


@pytest.mark.slow
def test_class_only_run_logs_the_weighted_loss(tmp_path: Path, tiny_model) -> None:
    """At step 1 (before any update) a class batch's loss is prior_loss_weight times the same batch's plain loss."""
    model = tiny_model("sd1x")
    plain = write_run(tmp_path / "plain", model, "sd1x", images=6, disable_validation=True, max_train_steps=1)
    assert main(["train", str(plain)]) == 0
    weighted = _class_run(tmp_path / "class", model, only=True, dataset=tmp_path / "plain" / "dataset",
                          max_train_steps=1, prior_loss_weight=0.25)
    assert main(["train", str(weighted)]) == 0
    first, second = metrics(tmp_path / "plain" / "output"), metrics(tmp_path / "class" / "output")
    assert first[1] > 0
    assert second[1] == pytest.approx(0.25 * first[1], rel=1e-5)


@pytest.mark.slow
def test_mixed_class_run_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    straight = _class_run(tmp_path / "straight", model, max_train_steps=6, checkpointing_steps=3,
                          prior_loss_weight=0.5)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and all(loss > 0 for loss in full.values())

    resumed_root = tmp_path / "resumed"
    resumed = _class_run(resumed_root, model, dataset=tmp_path / "straight" / "dataset", max_train_steps=6,
                         checkpointing_steps=3, prior_loss_weight=0.5, resume_from_checkpoint="latest")
    second = resumed_losses(tmp_path / "straight" / "output" / "checkpoints" / "step-000003", resumed)
    assert sorted(second) == [4, 5, 6] and all(second[step] == full[step] for step in (4, 5, 6)), (second, full)


def test_class_data_that_is_also_regularisation_data_is_refused_naming_both(tmp_path: Path, tiny_model,
                                                                            capsys) -> None:
    config = _class_run(tmp_path, tiny_model("sd1x"))
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[1]["is_regularisation_data"] = True
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "'dogs'" in err and "is_class_data" in err and "is_regularisation_data" in err


def test_negative_prior_loss_weight_is_refused(tmp_path: Path, tiny_model, capsys) -> None:
    config = _class_run(tmp_path, tiny_model("sd1x"), prior_loss_weight=-1)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "prior_loss_weight" in err
