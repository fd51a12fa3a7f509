"""The final model: a diffusers-format LoRA, a LyCORIS file, or a full diffusers pipeline folder.

- LoRA (lora_format): diffusers, output_dir/pytorch_lora_weights.safetensors, which the family's
  pipeline loads with `load_lora_weights(output_dir, weight_name="pytorch_lora_weights.safetensors")`;
  comfyui, output_dir/<run name>.safetensors in kohya names, for ComfyUI, A1111 and Forge.
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
        models = {family.denoiser_name(): trained.model}
        files = [family.save_lora(output_dir, components, models)] if "diffusers" in cfg.lora_format else []
        if "comfyui" in cfg.lora_format:
            files += _ui_lora(family, models, cfg, output_dir)
        logger.info("exported %s", ", ".join(map(str, files)))
        return files
    if trained.kind == "lycoris":
        from simpletuner.train.adapters import load_lycoris_config, save_lycoris_weights

        written = save_lycoris_weights(output_dir, trained.module, load_lycoris_config(cfg.lycoris_config))
    else:
        written = output_dir / PIPELINE_FOLDER
        family.pipeline(components).save_pretrained(written, safe_serialization=True)
    logger.info("exported %s", written)
    return [written]


def _ui_lora(family: ModelFamily, models: dict[str, Any], cfg: Any, output_dir: Path) -> list[Path]:
    """output_dir/<run name>.safetensors for ComfyUI, A1111 and Forge (publish/ui_file.py)."""
    from simpletuner.publish.kohya import ui_format_supported
    from simpletuner.publish.ui_file import export_ui_lora

    if not ui_format_supported(family.name):
        logger.info("lora_format=comfyui: %s LoRAs have no ComfyUI/A1111 format; not written", family.name)
        return []
    run_name = cfg.tracker_run_name or output_dir.resolve().name
    return [export_ui_lora(family.name, models, output_dir, run_name)]
