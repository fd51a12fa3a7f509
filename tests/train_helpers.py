"""Helpers for end-to-end training tests: a procedural dataset and a configuration around a tiny model."""

from __future__ import annotations

import json
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
