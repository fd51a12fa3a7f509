"""vae_cache_clear_each_epoch: random crops drawn again every epoch, their latents encoded when needed;
resume stays exact."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.data.records import SampleRef


def _crop_each_epoch(config: Path, clear: bool, crop_style: str = "random") -> Path:
    """The run's image dataset crops squares at crop_style; vae_cache_clear_each_epoch as `clear`."""
    datasets_file = config.parent / "multidatabackend.json"
    entries = json.loads(datasets_file.read_text())
    entries[0].update(crop=True, crop_style=crop_style, crop_aspect="square", vae_cache_clear_each_epoch=clear)
    datasets_file.write_text(json.dumps(entries))
    return config


def _prepared(config: Path):
    from simpletuner.config.load import load_settings
    from simpletuner.models.registry import get_family
    from simpletuner.train.data import TrainingData

    settings = load_settings(config)
    family = get_family(settings.training.model_family)
    components = family.load(settings.training)
    data = TrainingData.prepare(settings, family, components)
    data.ensure_cached(family, components, vae_batch_size=4, progress=False)
    return family, components, data


def _wide_refs(data, epoch: int) -> list[SampleRef]:
    """Two images with room for the square crop to move (96x64 sources), as the sampler hands them out."""
    shapes = data.datasets["shapes"]
    wide = [i for i, item in shapes.latent_items.items() if item.plan.original_size == (96, 64)][:2]
    return [SampleRef("shapes", shapes.assignment.records[i].path, (32, 32), i, epoch) for i in wide]


def test_later_epochs_encode_the_epochs_own_crops(tmp_path: Path, tiny_model) -> None:
    from simpletuner.cache.latents import load_pixels

    config = _crop_each_epoch(write_run(tmp_path, tiny_model("sd1x"), "sd1x"), clear=True)
    family, components, data = _prepared(config)
    shapes = data.datasets["shapes"]
    assert shapes.reencode_each_epoch
    means = {epoch: data.batch(_wide_refs(data, epoch), family, components, random.Random(0))["latent_mean"]
             for epoch in (0, 1, 2)}
    cached = torch.stack([shapes.latent_store.get(shapes.latent_items[ref.record].key)["mean"]
                          for ref in _wide_refs(data, 0)])
    assert torch.equal(means[0], cached)  # epoch 0 trains from the cache
    assert not torch.equal(means[1], means[0]) and not torch.equal(means[2], means[1])
    ref = _wide_refs(data, 1)[0]
    plan = shapes.plan(ref)
    assert plan.crop_box != shapes.assignment.plan(ref.record).crop_box
    with torch.no_grad():
        expected, _ = family.encode_images(components, load_pixels(shapes.latent_items[ref.record].source,
                                                                   plan)[None])
    torch.testing.assert_close(means[1][0], expected[0].float(), rtol=0, atol=1e-5)  # batch of 2 vs 1
    # later epochs' latents are never stored: the store holds the epoch-0 entries alone
    data.close()
    shapes.latent_store.refresh()
    assert sorted(shapes.latent_store.keys()) == sorted(item.key for item in shapes.latent_items.values())


def test_an_image_that_fails_in_a_later_epoch_is_left_out_not_substituted(tmp_path: Path, tiny_model) -> None:
    from bad_inputs import broken_png

    from simpletuner.cache.latents import load_pixels

    config = _crop_each_epoch(write_run(tmp_path, tiny_model("sd1x"), "sd1x"), clear=True)
    family, components, data = _prepared(config)
    shapes = data.datasets["shapes"]
    broken, good = _wide_refs(data, 1)
    broken_png(Path(shapes.latent_items[broken.record].source), (96, 64))  # cached at epoch 0, unreadable now
    usable, entries = data.entries([broken, good])
    assert usable == [good]  # the failed image is left out; no sibling stands in for it
    with torch.no_grad():
        expected, _ = family.encode_images(components, load_pixels(shapes.latent_items[good.record].source,
                                                                   shapes.plan(good))[None])
    torch.testing.assert_close(entries[0]["mean"], expected[0].float(), rtol=0, atol=1e-5)
    assert [(entry.path, entry.stage) for entry in data.skipped] == [(broken.path, "train")]
    assert broken.record in shapes.failed
    later, _ = data.entries(_wide_refs(data, 2))
    assert [ref.path for ref in later] == [good.path]  # out of every later batch, with no second report
    assert len(data.skipped) == 1
    batch = data.batch([broken, good], family, components, random.Random(0))
    assert batch["latent_mean"].shape[0] == 1
    data.close()


@pytest.mark.parametrize(("clear", "crop_style"), [(False, "random"), (True, "center")])
def test_without_clearing_or_random_crops_every_epoch_reads_the_cache(tmp_path: Path, tiny_model, clear,
                                                                      crop_style) -> None:
    config = _crop_each_epoch(write_run(tmp_path, tiny_model("sd1x"), "sd1x"), clear=clear, crop_style=crop_style)
    family, components, data = _prepared(config)
    assert not data.datasets["shapes"].reencode_each_epoch
    first = data.batch(_wide_refs(data, 0), family, components, random.Random(0))["latent_mean"]
    later = data.batch(_wide_refs(data, 3), family, components, random.Random(0))["latent_mean"]
    data.close()
    assert torch.equal(first, later)


@pytest.mark.slow
def test_resume_across_an_epoch_of_new_crops_is_exact(tmp_path: Path, tiny_model) -> None:
    """12 images, batch 2: 6 steps an epoch; steps 7 and 8 train on epoch 1's crops, encoded on the fly."""
    model = tiny_model("sd1x")
    options = dict(disable_validation=True, max_train_steps=8, checkpointing_steps=4, lora_dropout=0.1)
    straight = _crop_each_epoch(write_run(tmp_path / "straight", model, "sd1x", **options), clear=True)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")

    dataset = tmp_path / "straight" / "dataset"
    fixed = _crop_each_epoch(write_run(tmp_path / "fixed", model, "sd1x", dataset=dataset, **options), clear=False)
    assert main(["train", str(fixed)]) == 0
    cached_only = metrics(tmp_path / "fixed" / "output")
    assert all(cached_only[step] == full[step] for step in range(1, 7))  # epoch 0: the same cached crops
    assert any(cached_only[step] != full[step] for step in (7, 8))  # epoch 1: other crops

    resumed_root = tmp_path / "resumed"
    resumed = _crop_each_epoch(write_run(resumed_root, model, "sd1x", dataset=dataset,
                                         resume_from_checkpoint="latest", **options), clear=True)
    checkpoint = tmp_path / "straight" / "output" / "checkpoints" / "step-000004"
    shutil.copytree(checkpoint, resumed_root / "output" / "checkpoints" / "step-000004")
    assert main(["train", str(resumed)]) == 0
    second_half = metrics(resumed_root / "output")
    assert sorted(second_half) == [5, 6, 7, 8]
    assert all(second_half[step] == full[step] for step in (5, 6, 7, 8)), (second_half, full)
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
