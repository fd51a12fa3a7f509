"""The final model: a diffusers-format LoRA, a LyCORIS file, or a full diffusers pipeline folder.

- LoRA: output_dir/pytorch_lora_weights.safetensors, which the family's pipeline
  loads with `load_lora_weights(output_dir, weight_name="pytorch_lora_weights.safetensors")`.
- LyCORIS: output_dir/pytorch_lora_weights.safetensors through lycoris (load it with lycoris).
- full: output_dir/pipeline/, a folder `DiffusionPipeline.from_pretrained` loads.
With EMA, the averaged weights are what is exported. Everything is written into
output_dir/.tmp-export/ first and moved into place when complete, so a failed export (a full
disk) never leaves a half-written model under the final name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.adapters import Trained
    from simpletuner.train.ema import EMA

logger = get_logger(__name__)
PIPELINE_FOLDER = "pipeline"
STAGING_FOLDER = ".tmp-export"


def export_model(family: ModelFamily, components: Components, trained: Trained, cfg: Any,
                 ema: EMA | None = None) -> list[Path]:
    """Write the final weights into cfg.output_dir; returns the files or folders written."""
    output_dir = Path(cfg.output_dir)
    staging = output_dir / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that failed
    staging.mkdir(parents=True)
    if ema is not None:
        ema.copy_to()
    if trained.kind == "lora":
        written = family.save_lora(staging, components, {family.denoiser_name(): trained.model})
    elif trained.kind == "lycoris":
        from simpletuner.train.adapters import load_lycoris_config, save_lycoris_weights

        written = save_lycoris_weights(staging, trained.module, load_lycoris_config(cfg.lycoris_config))
    else:
        written = staging / PIPELINE_FOLDER
        family.pipeline(components).save_pretrained(written, safe_serialization=True)
    _move_into(staging, output_dir)  # every file the format wrote (peft writes a config beside the weights)
    final = output_dir / Path(written).relative_to(staging)
    logger.info("exported %s", final)
    return [final]


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move each complete entry of `staging` into `output_dir`, replacing an earlier export's; remove `staging`."""
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)  # the pipeline folder of an earlier export
        entry.replace(target)
    staging.rmdir()
