"""The final model: a diffusers-format LoRA, a LyCORIS file, or a full diffusers pipeline folder.

- LoRA: output_dir/pytorch_lora_weights.safetensors, which the family's pipeline
  loads with `load_lora_weights(output_dir, weight_name="pytorch_lora_weights.safetensors")`.
- LyCORIS: output_dir/pytorch_lora_weights.safetensors through lycoris (load it with lycoris).
- full: output_dir/pipeline/, a folder `DiffusionPipeline.from_pretrained` loads.
With EMA, the averaged weights are what is exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.adapters import Trained
    from simpletuner.train.ema import EMA

logger = get_logger(__name__)
PIPELINE_FOLDER = "pipeline"


def export_model(family: ModelFamily, components: Components, trained: Trained, cfg: Any,
                 ema: EMA | None = None) -> list[Path]:
    """Write the final weights into cfg.output_dir; returns the files or folders written."""
    output_dir = Path(cfg.output_dir)
    if ema is not None:
        ema.copy_to()
    if trained.kind == "lora":
        written = family.save_lora(output_dir, components, {family.denoiser_name(): trained.model})
    elif trained.kind == "lycoris":
        from simpletuner.train.adapters import load_lycoris_config, save_lycoris_weights

        written = save_lycoris_weights(output_dir, trained.module, load_lycoris_config(cfg.lycoris_config))
    else:
        if getattr(cfg, "fuse_qkv_projections", False):  # saved with diffusers' separate projections
            from simpletuner.train.fusion import unfuse_qkv

            unfuse_qkv(family.denoiser(components))
        written = output_dir / PIPELINE_FOLDER
        family.pipeline(components).save_pretrained(written, safe_serialization=True)
    logger.info("exported %s", written)
    return [written]
