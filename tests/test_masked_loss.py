"""Masked loss: masks follow their image's crop, are cached at latent size, and zero the loss where black."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import metrics, resumed_losses, write_run

from simpletuner.cache.keys import SourceIdentity, Transform
from simpletuner.cache.latents import load_pixels
from simpletuner.cache.masks import latent_mask, mask_key
from simpletuner.cache.store import TensorStore
from simpletuner.cli import main
from simpletuner.data.records import ImagePlan, ImageRecord


def _half_mask(path: Path, size: tuple[int, int], white_right: bool = True) -> None:
    """Black on the left half, white on the right (or the other way round)."""
    width, height = size
    image = Image.new("L", size, 0 if white_right else 255)
    image.paste(255 if white_right else 0, (width // 2, 0, width, height))
    image.save(path)


def test_mask_follows_the_crop_and_is_averaged_to_latent_size(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    _half_mask(path, (96, 64))
    # resized to 48x32, then the right-most 32x32 kept: a quarter black, three quarters white
    plan = ImagePlan((96, 64), (48, 32), (16, 0, 48, 32), (32, 32))
    mask = latent_mask(load_pixels(str(path), plan), (4, 4))
    assert mask.shape == (1, 4, 4)
    # (LANCZOS rings a little at the edge)
    assert torch.allclose(mask[0, :, 0], torch.zeros(4), atol=0.02)
    assert torch.allclose(mask[0, :, 1:], torch.ones(4, 3), atol=0.02)
    left = latent_mask(load_pixels(str(path), ImagePlan((96, 64), (48, 32), (0, 0, 32, 32), (32, 32))), (4, 4))
    assert torch.allclose(left[0, :, :3], torch.zeros(4, 3), atol=0.02)  # the left crop: three quarters black
    assert torch.allclose(left[0, :, 3], torch.ones(4), atol=0.02)
    flipped = latent_mask(load_pixels(str(path), plan, flip=True), (4, 4))
    assert torch.allclose(flipped, mask.flip(-1), atol=1e-6)


def test_mask_key_changes_with_file_crop_and_latent_size() -> None:
    record = ImageRecord("a.png", 100, 1.0, 96, 64)
    source = SourceIdentity.of("/masks", record)
    plan = ImagePlan((96, 64), (48, 32), (16, 0, 48, 32), (32, 32))
    key = mask_key(source, Transform.of(plan), (4, 4))
    assert key == mask_key(SourceIdentity.of("/masks/", record), Transform.of(plan), (4, 4))
    assert key != mask_key(SourceIdentity.of("/masks", ImageRecord("a.png", 101, 1.0, 96, 64)), Transform.of(plan),
                           (4, 4))
    assert key != mask_key(source, Transform.of(ImagePlan((96, 64), (48, 32), (0, 0, 32, 32), (32, 32))), (4, 4))
    assert key != mask_key(source, Transform.of(plan, flip=True), (4, 4))
    assert key != mask_key(source, Transform.of(plan), (8, 8))


def test_a_fully_masked_region_gives_no_gradient_from_its_pixels(tiny_model) -> None:
    """The real step on a tiny UNet: the loss's gradient w.r.t. each predicted latent pixel is zero where the
    mask is black, and not zero where it is white."""
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.registry import get_family
    from simpletuner.models.objectives import training_loss

    cfg = TrainingConfig(model_family="sd1x", pretrained_model_name_or_path=str(tiny_model("sd1x")),
                         output_dir="unused", model_type="full")
    family = get_family("sd1x")
    components = family.load(cfg)
    objective = family.objective(cfg, components)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=generator)
    text = family.text_outputs(components, ["a red circle", "a blue square"])
    mask = torch.ones(2, 1, 4, 4)
    mask[:, :, :, :2] = 0
    draw = objective.draw(latents, generator)
    captured = {}
    unet = family.denoiser(components).requires_grad_(True)

    def keep_gradient(module, args, output) -> None:
        output[0].register_hook(lambda grad: captured.setdefault("grad", grad))

    handle = unet.register_forward_hook(keep_gradient)
    try:
        loss = training_loss(family, components, objective, {"latents": latents, "text": text, "loss_mask": mask},
                             draw)
        loss.backward()
    finally:
        handle.remove()
    grad = captured["grad"]
    assert torch.count_nonzero(grad[..., :2]) == 0
    assert torch.count_nonzero(grad[..., 2:]) == grad[..., 2:].numel()


def _masked_run(root: Path, model: Path, *, white_right: bool = True, black: bool = False,
                masks: Path | None = None, family: str = "sd1x", **options) -> Path:
    """A run whose images each have a mask file (black everywhere, or half black) in a mask dataset
    (written to root/masks, or an existing `masks` folder)."""
    config = write_run(root, model, family, images=6, disable_validation=True, **options)
    images = [] if masks else sorted(Path(options.get("dataset") or root / "dataset").glob("*.png"))
    masks = masks or root / "masks"
    masks.mkdir(exist_ok=True)
    for image in images:
        size = Image.open(image).size
        if black:
            Image.new("L", size, 0).save(masks / image.name)
        else:
            _half_mask(masks / image.name, size, white_right)
    backends = json.loads((root / "multidatabackend.json").read_text())
    backends[0]["conditioning_data"] = "masks"
    backends.append({"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
                     "instance_data_dir": str(masks)})
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1x", "flux"])
def test_black_masks_train_nothing(tmp_path: Path, tiny_model, family: str, capsys) -> None:
    """Every pixel masked: the loss is exactly zero and the LoRA stays at its initial (zero) effect."""
    config = _masked_run(tmp_path, tiny_model(family), black=True, max_train_steps=2, family=family)
    assert main(["train", str(config)]) == 0
    assert set(metrics(tmp_path / "output").values()) == {0.0}
    weights = load_file(tmp_path / "output" / "pytorch_lora_weights.safetensors")
    lora_b = [tensor for key, tensor in weights.items() if "lora_B" in key]
    assert lora_b and all(torch.count_nonzero(tensor) == 0 for tensor in lora_b)
    shards = sorted(path.name for path in (tmp_path / "cache").rglob("masks_rank0*.shard"))
    assert shards, "no mask entries were cached"
    assert main(["train", str(config), f"--output_dir={tmp_path / 'again'}"]) == 0
    assert sorted(path.name for path in (tmp_path / "cache").rglob("masks_rank0*.shard")) == shards  # all hits

    # masks are live entries: `cache prune` keeps them, and `cache` finds them all
    assert main(["cache", "prune", str(config)]) == 0
    assert len(TensorStore(str(tmp_path / "cache" / "vae" / "shapes"))) == 12  # 6 latents + 6 masks
    capsys.readouterr()
    assert main(["cache", str(config)]) == 0
    assert "masks: 6 unique, 6 already cached, 0 encoded" in capsys.readouterr().out


@pytest.mark.slow
def test_masked_run_trains_and_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    straight = _masked_run(tmp_path / "straight", model, max_train_steps=4, checkpointing_steps=2)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    assert all(loss > 0 for loss in full.values())

    resumed_root = tmp_path / "resumed"
    resumed = _masked_run(resumed_root, model, max_train_steps=4, checkpointing_steps=2,
                          resume_from_checkpoint="latest", dataset=tmp_path / "straight" / "dataset",
                          masks=tmp_path / "straight" / "masks")
    second = resumed_losses(tmp_path / "straight" / "output" / "checkpoints" / "step-000002", resumed)
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)

    # the other half masked: other pixels train, so the losses differ
    other = _masked_run(tmp_path / "other", model, white_right=False, max_train_steps=4, checkpointing_steps=2,
                        dataset=tmp_path / "straight" / "dataset")
    assert main(["train", str(other)]) == 0
    assert metrics(tmp_path / "other" / "output") != full


def test_mask_dataset_that_no_image_dataset_names_is_refused(tmp_path: Path, tiny_model, capsys) -> None:
    config = _masked_run(tmp_path, tiny_model("sd1x"))
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    del backends[0]["conditioning_data"]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "'masks'" in err and "conditioning_type='mask'" in err and "conditioning_data" in err


def test_masked_loss_probability_applies_each_samples_mask_by_chance(tmp_path: Path, tiny_model) -> None:
    """masked_loss_probability p: each sample of a batch keeps its mask with chance p, else weighs 1 everywhere;
    the draw is per sample (a batch can mix both) and follows the batch's seed."""
    import random

    from train_helpers import prepared_data

    config = _masked_run(tmp_path, tiny_model("sd1x"), masked_loss_probability=0.5)
    data, family, components, sampler = prepared_data(config)
    assert data.mask_probability == 0.5
    kept = dropped = mixed = 0
    for seed in range(60):
        refs = next(sampler)
        batch = data.batch(refs, family, components, random.Random(seed))
        again = data.batch(refs, family, components, random.Random(seed))
        assert torch.equal(batch["loss_mask"], again["loss_mask"])  # the same seed, the same choice
        data.mask_probability = 1.0
        masks = data.batch(refs, family, components, random.Random(seed))["loss_mask"]
        data.mask_probability = 0.0
        assert torch.equal(data.batch(refs, family, components, random.Random(seed))["loss_mask"],
                           torch.ones_like(masks))
        data.mask_probability = 0.5
        assert not torch.equal(masks, torch.ones_like(masks))  # half of every mask is black
        rows = [torch.equal(row, mask) for row, mask in zip(batch["loss_mask"], masks)]
        for row, applied in zip(batch["loss_mask"], rows):
            assert applied or torch.equal(row, torch.ones_like(row))
        kept += sum(rows)
        dropped += len(rows) - sum(rows)
        mixed += 0 < sum(rows) < len(rows)
    data.close()
    assert 0.3 < kept / (kept + dropped) < 0.7 and mixed > 0, (kept, dropped, mixed)


@pytest.mark.slow
def test_masked_loss_probability_zero_trains_as_without_masks(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    plain = write_run(tmp_path / "plain", model, "sd1x", images=6, disable_validation=True, max_train_steps=3)
    assert main(["train", str(plain)]) == 0
    never = _masked_run(tmp_path / "never", model, black=True, max_train_steps=3, masked_loss_probability=0.0,
                        dataset=tmp_path / "plain" / "dataset")
    assert main(["train", str(never)]) == 0
    assert metrics(tmp_path / "never" / "output") == metrics(tmp_path / "plain" / "output")


@pytest.mark.slow
def test_masked_loss_probability_run_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    straight = _masked_run(tmp_path / "straight", model, max_train_steps=4, checkpointing_steps=2,
                           masked_loss_probability=0.5)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    resumed_root = tmp_path / "resumed"
    resumed = _masked_run(resumed_root, model, max_train_steps=4, checkpointing_steps=2, masked_loss_probability=0.5,
                          resume_from_checkpoint="latest", dataset=tmp_path / "straight" / "dataset",
                          masks=tmp_path / "straight" / "masks")
    second = resumed_losses(tmp_path / "straight" / "output" / "checkpoints" / "step-000002", resumed)
    assert sorted(second) == [3, 4] and all(second[step] == full[step] for step in (3, 4)), (second, full)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_masked_loss_probability_outside_0_1_is_refused(tmp_path: Path, tiny_model, capsys, value: float) -> None:
    config = _masked_run(tmp_path, tiny_model("sd1x"), masked_loss_probability=value)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "masked_loss_probability" in err
