"""The LoRA file for ComfyUI, A1111 and Forge: `<run name>.safetensors` in kohya names.

`export_ui_lora` reads the trained peft adapters (weights, alpha, DoRA base weights), converts
them with `publish.kohya` and writes the file with `write_ui_lora`: under a temporary name, renamed
when complete, permissions 0644. UI users keep many LoRAs in one folder, so the file is named
after the run.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from simpletuner.publish.kohya import FORMATS, to_ui_state_dict

DEFAULT_NAME = "lora"
# what A1111 reads to file a LoRA under an SD version (extensions-builtin/Lora/network.py detect_version)
_A1111_VERSION = {"sdxl": {"ss_base_model_version": "sdxl_base_v1-0"},
                  "sdxl_refiner": {"ss_base_model_version": "sdxl_refiner_v1-0"},
                  "kolors": {"ss_base_model_version": "sdxl_base_v1-0"},
                  "sd2x": {"ss_v2": "True"}}


def ui_file_name(run_name: str | None) -> str:
    """`<run name>.safetensors`, the name reduced to letters, digits, '-', '_' and '.'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name or "").strip("._-")[:120]
    return f"{stem or DEFAULT_NAME}.safetensors"


def write_ui_lora(directory: str | Path, run_name: str | None, tensors: Mapping[str, Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to directory/<run name>.safetensors atomically (0644); returns the path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ui_file_name(run_name)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file({key: value.detach().contiguous() for key, value in tensors.items()}, temp,
                  metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def ui_metadata(family_name: str, run_name: str | None) -> dict[str, str]:
    """What A1111 reads from a LoRA's header: its display name and the SD version it belongs to."""
    return {"ss_output_name": Path(ui_file_name(run_name)).stem, **_A1111_VERSION.get(family_name, {})}


def adapter_alphas(model: nn.Module, prefix: str) -> dict[str, float]:
    """`prefix.<module>` -> the alpha the UIs need for peft's scale (alpha / rank, rsLoRA included)."""
    return {f"{prefix}.{name}": float(layer.scaling["default"]) * int(layer.r["default"])
            for name, layer in _lora_layers(model)}


def adapter_base_weights(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """`prefix.<module>` -> the frozen weight each peft LoRA layer wraps."""
    return {f"{prefix}.{name}": layer.get_base_layer().weight for name, layer in _lora_layers(model)}


def export_ui_lora(family_name: str, models: Mapping[str, nn.Module], directory: str | Path,
                   run_name: str | None, metadata: Mapping[str, str] | None = None) -> Path:
    """Convert the peft adapters of `models` (pipeline component name -> model) and write the UI file."""
    from simpletuner.train.adapters import lora_state_dict

    state: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    bases: dict[str, Tensor] = {}
    for prefix, model in models.items():
        state.update({f"{prefix}.{key}": value for key, value in lora_state_dict(model).items()})
        alphas.update(adapter_alphas(model, prefix))
        bases.update(adapter_base_weights(model, prefix))
    denoiser = models.get(FORMATS[family_name].denoiser) if family_name in FORMATS else None
    config = dict(denoiser.config) if denoiser is not None and hasattr(denoiser, "config") else None
    tensors = to_ui_state_dict(family_name, state, alphas, denoiser_config=config, base_weights=bases)
    return write_ui_lora(directory, run_name, tensors, {**ui_metadata(family_name, run_name), **(metadata or {})})


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A]
