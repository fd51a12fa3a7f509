"""The LoRA file for ComfyUI, A1111 and Forge: `<run name>.safetensors` in kohya names (format "comfyui").

`write_ui_lora` converts a `TrainedLora` with `publish.kohya` (names, `.alpha` tensors, DoRA's
`dora_scale`) and writes it with `publish.lora_files.save_file_atomic` (a temporary name, 0644,
renamed when complete). UI users keep many LoRAs in one folder, so the file is named after the run:
the `modelspec.title` of its metadata (tracker_run_name, else the output folder's name). The header
holds the LoRA's metadata plus what A1111 reads (`ss_output_name`, the SD version).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from simpletuner.publish.kohya import FORMATS, to_ui_state_dict

if TYPE_CHECKING:
    from simpletuner.models.base import ModelFamily
    from simpletuner.train.adapters import TrainedLora

DEFAULT_NAME = "lora"
TITLE = "modelspec.title"
# what A1111 reads to file a LoRA under an SD version (extensions-builtin/Lora/network.py detect_version)
_A1111_VERSION = {"sdxl": {"ss_base_model_version": "sdxl_base_v1-0"},
                  "sdxl_refiner": {"ss_base_model_version": "sdxl_refiner_v1-0"},
                  "kolors": {"ss_base_model_version": "sdxl_base_v1-0"},
                  "sd2x": {"ss_v2": "True"}}


def ui_file_name(run_name: str | None) -> str:
    """`<run name>.safetensors`, the name reduced to letters, digits, '-', '_' and '.'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name or "").strip("._-")[:120]
    return f"{stem or DEFAULT_NAME}.safetensors"


def ui_metadata(family_name: str, run_name: str | None) -> dict[str, str]:
    """What A1111 reads from a LoRA's header: its display name and the SD version it belongs to."""
    return {"ss_output_name": Path(ui_file_name(run_name)).stem, **_A1111_VERSION.get(family_name, {})}


def ui_supports(family: ModelFamily) -> bool:
    """Whether the family has a LoRA format that ComfyUI (and A1111/Forge where they load the family) load."""
    return family.name in FORMATS


def ui_needs(family: ModelFamily, lora: TrainedLora) -> frozenset[str]:
    """What the UI file needs of the base model that `lora` lacks: "model_configs" (a UNet's block layout,
    for its original module names) and "base_weights" (the weights DoRA modules wrap, for dora_scale)."""
    needs = set()
    denoiser = FORMATS[family.name].denoiser if family.name in FORMATS else None
    if (denoiser in lora.layers and FORMATS[family.name].transformer_modules is None
            and denoiser not in lora.model_configs):
        needs.add("model_configs")
    if any(config.get("use_dora") and component not in lora.base_weights
           for component, config in lora.configs.items()):
        needs.add("base_weights")
    return frozenset(needs)


def ui_state_dict(family: ModelFamily, lora: TrainedLora) -> dict[str, Tensor]:
    """The UI file's tensors for `lora` (publish.kohya's names, alphas and DoRA scales)."""
    state: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    bases: dict[str, Tensor] = {}
    for component, layers in lora.layers.items():
        state.update({f"{component}.{key}": value for key, value in layers.items()})
        for module in lora.modules(component):
            alphas[f"{component}.{module}"] = _ui_alpha(lora, component, module)
        bases.update({f"{component}.{module}": weight
                      for module, weight in lora.base_weights.get(component, {}).items()})
    denoiser = FORMATS[family.name].denoiser if family.name in FORMATS else None
    return to_ui_state_dict(family.name, state, alphas, denoiser_config=lora.model_configs.get(denoiser),
                            base_weights=bases)


def write_ui_lora(family: ModelFamily, lora: TrainedLora, directory: Path) -> Path:
    """directory/<run name>.safetensors (the LoraFormat writer of "comfyui"); returns the path."""
    from simpletuner.publish.lora_files import save_file_atomic

    run_name = lora.metadata.get(TITLE)
    header = {**lora.metadata, **ui_metadata(family.name, run_name)}
    return save_file_atomic(ui_state_dict(family, lora), Path(directory) / ui_file_name(run_name), header)


def _ui_alpha(lora: TrainedLora, component: str, module: str) -> float:
    """The alpha the UIs need for peft's scale: they scale by alpha / rank; rsLoRA scales by alpha / sqrt(rank)."""
    alpha = lora.alpha(component, module)
    return alpha * math.sqrt(lora.rank(component, module)) if lora.configs[component].get("use_rslora") else alpha
