"""The demo run: procedural images -> tiny SDXL-architecture model -> cache -> LoRA -> validation.

Everything lives under one folder (default ./demo-output): the dataset, the tiny
model, the caches and the training outputs. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_STEPS = 300


def demo_config(root: Path, model: Path, dataset: Path, steps: int) -> dict:
    """The demo's configuration, as a user would write it (config.json form)."""
    return {
        "model_family": "sdxl",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(root / "output"),
        "cache_dir": str(root / "cache"),
        "data_backend_config": str(root / "multidatabackend.json"),
        "resolution": 64,
        "resolution_type": "pixel_area",
        "mixed_precision": "no",
        "base_model_default_dtype": "fp32",
        "vae_dtype": "fp32",
        "lora_rank": 8,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 20,
        "train_batch_size": 4,
        "max_train_steps": steps,
        "checkpointing_steps": max(steps // 2, 1),
        "checkpoints_total_limit": 2,
        "validation_steps": max(steps // 2, 1),
        "validation_prompt": "a red circle on a blue background",
        "validation_resolution": "64",
        "validation_num_inference_steps": 8,
        "validation_guidance": 4.0,
        "logging_steps": 10,
        "report_to": "tensorboard",
        "seed": 42,
    }


def write_demo(root: Path, steps: int = DEMO_STEPS, images: int = 48) -> Path:
    """Draw the dataset, build the tiny model and write config.json + multidatabackend.json; returns config.json."""
    from simpletuner.demo.dataset import write_dataset
    from simpletuner.testing.tiny import build

    root.mkdir(parents=True, exist_ok=True)
    dataset = write_dataset(root / "dataset", count=images)
    model = build("sdxl", root / "model")
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(dataset), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel_area", "crop": False},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(root / "cache" / "text")},
    ], indent=2))
    config = root / "config.json"
    config.write_text(json.dumps(demo_config(root, model, dataset, steps), indent=2))
    return config
