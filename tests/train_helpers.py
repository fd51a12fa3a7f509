"""Helpers for end-to-end training tests: a procedural dataset and a configuration around a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from simpletuner.demo.dataset import write_dataset


def write_run(root: Path, model: Path, family: str, *, images: int = 12, dataset: Path | None = None,
              **options: Any) -> Path:
    """A config.json + multidatabackend.json under `root` training `model`; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    dataset = dataset or write_dataset(root / "dataset", count=images)
    resolution = options.pop("resolution", 64 if family.startswith("sdxl") else 32)
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "instance_data_dir": str(dataset), "caption_strategy": "textfile",
         "resolution": resolution, "resolution_type": "pixel_area"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]))
    config = {
        "model_family": family.removesuffix("_refiner"),
        "model_type": "lora",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(root / "output"),
        "cache_dir": str(root / "cache"),
        "data_backend_config": str(root / "multidatabackend.json"),
        "resolution": resolution,
        "mixed_precision": "no",
        "base_model_default_dtype": "fp32",
        "vae_dtype": "fp32",
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "validation_steps": 4,
        "validation_prompt": "a red circle on a blue background",
        "validation_resolution": str(resolution),
        "validation_num_inference_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "seed": 7,
    }
    config.update(options)
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path


def metrics(output_dir: Path) -> dict[int, float]:
    """step -> loss, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def resumed_losses(checkpoint: Path, config: Path) -> dict[int, float]:
    """Train the run `config` (resume_from_checkpoint="latest", output under its folder's `output/`) from a copy of
    another run's `checkpoint`; step -> loss of the steps it trained."""
    from simpletuner.cli import main

    output = config.parent / "output"
    shutil.copytree(checkpoint, output / "checkpoints" / checkpoint.name)
    assert main(["train", str(config)]) == 0
    return metrics(output)


def prepared_data(config: Path, on_demand: bool = False):
    """(TrainingData cached as `train` does, family, components, a sampler over it) for a one-dataset run."""
    from simpletuner.config.load import load_settings
    from simpletuner.data.sampler import MultiDatasetSampler, SamplerDataset
    from simpletuner.models.registry import get_family
    from simpletuner.train.data import TrainingData

    settings = load_settings(str(config), [])
    family = get_family(settings.training.model_family)
    components = family.load(settings.training)
    data = TrainingData.prepare(settings, family, components)
    data.ensure_cached(family, components, vae_batch_size=4, progress=False, on_demand=on_demand)
    (dataset,) = [d for d in settings.datasets if d.id in data.datasets]
    sampler = MultiDatasetSampler.from_config(
        settings.training, [SamplerDataset.from_config(dataset, data.datasets[dataset.id].assignment)])
    return data, family, components, sampler


def own_latent(data, family, components, ref):
    """The latent mean of the sample's own image, encoded now."""
    import torch

    from simpletuner.cache.latents import load_pixels

    item = data.datasets[ref.dataset_id].latent_items[ref.record]
    pixels = load_pixels(item.source, item.plan)[None]
    with torch.no_grad():
        mean, _std = family.encode_images(components, pixels)
    return mean[0].float()


def assert_epoch_uses_own_latents(config: Path, left_out: set[str]) -> int:
    """Two epochs of the run's batches (as `train` builds them): no left-out image appears, and every
    sample's latent is its own image's (encoded again here). Returns how many samples were checked."""
    import random

    import torch

    data, family, components, sampler = prepared_data(config)
    checked = 0
    for _ in range(2 * sampler.steps_in_epoch):
        usable, entries = data.entries(next(sampler))
        for ref, entry in zip(usable, entries):
            assert ref.path.split("/")[-1] not in left_out, ref.path
            assert torch.allclose(entry["mean"], own_latent(data, family, components, ref), atol=1e-5), ref.path
            checked += 1
        batch = data.batch(usable, family, components, random.Random(0))
        assert torch.equal(batch["latent_mean"], torch.stack([entry["mean"] for entry in entries]))
    data.close()
    return checked


def flux_inputs(model: Any) -> dict[str, Any]:
    """A fixed batch for a Flux transformer's forward: 16 image and 8 text tokens, seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    config, tokens, text_tokens = model.config, 16, 8
    return dict(hidden_states=torch.randn(1, tokens, config.in_channels, generator=generator),
                encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
                guidance=torch.tensor([3.5]) if config.guidance_embeds else None)
