"""The demo run: procedural images -> tiny SDXL-architecture model -> cache -> LoRA -> validation.

Everything lives under one folder (default ./demo-output): the dataset, the tiny
model, the caches and the training outputs. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from simpletuner.errors import UserError

DEMO_STEPS = 300
MARKER = ".simpletuner-demo"  # marks a folder the demo made, so a re-run may clear its outputs
# what a demo run writes and a new run starts without; dataset, model and caches are reused
RUN_OUTPUTS = ("output",)


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

    _start_fresh(root)
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


def _start_fresh(root: Path) -> None:
    """A new demo run starts without the previous run's outputs (metrics, logs, checkpoints, images).

    Only a folder the demo made (it holds MARKER) is cleared; any other non-empty folder is refused."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise UserError(f"--output {root}: the folder is not empty and was not made by `simpletuner demo`; "
                        "choose a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by simpletuner demo; a new demo run clears output/ here\n")
    for name in RUN_OUTPUTS:
        if (root / name).exists():
            print(f"demo: removing the previous run's {root / name}", flush=True)
            shutil.rmtree(root / name)
