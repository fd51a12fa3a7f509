"""LoRA files in the formats that diffusers and peft load, written from a `TrainedLora`.

- diffusers: `pytorch_lora_weights.safetensors`, peft's names under the pipeline component's prefix
  (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` for DoRA; a text encoder's
  DoRA magnitudes as `.lora_magnitude_vector.weight`, see `MAGNITUDE`; a text encoder other than CLIP in
  diffusers' `.lora_linear_layer.down/up` names, see `_file_names`), one key style per component;
  rank, alpha and DoRA in the `lora_adapter_metadata` header entry, from which the pipeline's
  `load_lora_weights` builds the adapter.
- peft: an adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained(model, folder)` loads, for pipelines without a LoRA loader.
Every file is written under a temporary name, made 0644 and renamed; its header carries the LoRA's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simpletuner.atomic import written_atomically
from simpletuner.errors import UserError
from simpletuner.train.adapters import LORA_WEIGHTS, TrainedLora

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MAGNITUDE = ".lora_magnitude_vector"
# diffusers loads a text encoder's LoRA through transformers' `load_adapter`, which takes a DoRA magnitude only
# as `<module>.lora_magnitude_vector.weight`: under peft's name it is reported missing and left untrained.
TEXT_ENCODER_PREFIX = "text_encoder"
CLIP_TEXT_MODULES = (".q_proj", ".k_proj", ".v_proj", ".out_proj")  # diffusers' PEFT_TO_DIFFUSERS names


def _file_names(component: str, layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`layers` (peft's names) as the diffusers file names them for `component`.

    diffusers' text-encoder loader recognises peft's names only on CLIP's attention modules
    (`CLIP_TEXT_MODULES`); a text encoder with other modules (Kolors' ChatGLM: query_key_value, dense)
    is written in diffusers' own `lora_linear_layer.down` / `.up` names, which it maps back to peft's.
    """
    if not component.startswith(TEXT_ENCODER_PREFIX):
        return dict(layers)
    renamed = {f"{key}.weight" if key.endswith(MAGNITUDE) else key: value for key, value in layers.items()}
    modules = {key.rsplit(".lora_", 1)[0] for key in layers}
    if all(module.endswith(CLIP_TEXT_MODULES) for module in modules):
        return renamed
    return {key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): value
            for key, value in renamed.items()}


def _peft_name(key: str) -> str:
    key = key.replace(".lora_linear_layer.down.", ".lora_A.").replace(".lora_linear_layer.up.", ".lora_B.")
    return key.removesuffix(".weight") if key.endswith(f"{MAGNITUDE}.weight") else key


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors' save_file to a temporary name beside `path`, made 0644, then renamed over it."""
    from safetensors.torch import save_file

    with written_atomically(path, mode=0o644) as temp:
        save_file(dict(tensors), str(temp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def write_diffusers_lora(directory: str | Path, lora: TrainedLora) -> Path:
    """Write `pytorch_lora_weights.safetensors` through the pipeline class's `save_lora_weights`.

    Keys are peft's names under the component prefix (`unet.<module>.lora_A.weight`), the one style
    that diffusers' loader takes as is; alpha, rank and DoRA travel in the `lora_adapter_metadata`
    header entry (the configuration `load_lora_weights` builds the adapter from), beside `lora.metadata`.
    """
    import diffusers
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    pipeline_class = getattr(diffusers, lora.pipeline_class)
    adapter_metadata = {f"{name}.{key}": value for name, config in lora.configs.items()
                        for key, value in config.items()}
    header = {**lora.metadata, "format": "pt",
              LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}

    def save(weights: dict[str, torch.Tensor], filename: str) -> None:
        save_file_atomic(weights, filename, header)

    kwargs = {f"{name}_lora_layers": _file_names(name, layers) for name, layers in lora.layers.items()}
    pipeline_class.save_lora_weights(str(directory), weight_name=LORA_WEIGHTS, save_function=save,
                                     safe_serialization=True, **kwargs)
    return Path(directory) / LORA_WEIGHTS


def read_diffusers_lora(file: str | Path, pipeline_class: str) -> TrainedLora:
    """A diffusers LoRA file written by `write_diffusers_lora`, back as a TrainedLora."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    layers: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(file), framework="pt") as handle:
        header = dict(handle.metadata() or {})
        for key in handle.keys():
            component, _, name = key.partition(".")
            layers.setdefault(component, {})[_peft_name(name)] = handle.get_tensor(key)
    packed = json.loads(header.pop(LORA_ADAPTER_METADATA_KEY, "{}"))
    configs: dict[str, dict[str, Any]] = {name: {} for name in layers}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    header.pop("format", None)
    missing = [name for name in layers if "r" not in configs[name]]
    if missing:
        raise UserError(f"{file}: no adapter configuration (rank, alpha) for {', '.join(missing)} in its header; "
                        "it was not written by simpletuner")
    return TrainedLora(pipeline_class, layers, configs, header)


def save_lora_weights(directory: str | Path, pipeline_class: Any, components: Mapping[str, nn.Module],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapters of `components` (pipeline component name -> model carrying a peft LoRA) to
    `directory/pytorch_lora_weights.safetensors`, which the pipeline's `load_lora_weights` loads whole."""
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    return write_diffusers_lora(directory, TrainedLora.from_models(name, components, metadata))


def write_peft_lora(directory: str | Path, lora: TrainedLora) -> Path:
    """The one component's adapter as peft's adapter folder; returns its weights file."""
    if len(lora.layers) != 1:
        raise UserError(f"peft's adapter folder holds one model's adapter, not {', '.join(sorted(lora.layers))}")
    [(component, layers)] = lora.layers.items()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"{PEFT_PREFIX}{key}": value for key, value in layers.items()}
    written = save_file_atomic(weights, directory / PEFT_WEIGHTS, {**lora.metadata, "format": "pt"})
    with written_atomically(directory / PEFT_CONFIG, mode=0o644) as temp:
        temp.write_text(json.dumps(lora.configs[component], indent=2, sort_keys=True))  # peft's LoraConfig.to_dict()
    return written


def read_peft_lora(directory: str | Path, pipeline_class: str, component: str) -> TrainedLora:
    """An adapter folder written by `write_peft_lora`, back as the LoRA of `component`."""
    from safetensors import safe_open

    directory = Path(directory)
    if not (directory / PEFT_WEIGHTS).is_file() or not (directory / PEFT_CONFIG).is_file():
        raise UserError(f"{directory}: no {PEFT_WEIGHTS} with {PEFT_CONFIG}; it is not the output or a checkpoint "
                        "of a LoRA run, or a checkpoint saved before checkpoints kept the LoRA files")
    with safe_open(str(directory / PEFT_WEIGHTS), framework="pt") as handle:
        header = {key: value for key, value in (handle.metadata() or {}).items() if key != "format"}
        layers = {key.removeprefix(PEFT_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    config = json.loads((directory / PEFT_CONFIG).read_text())
    return TrainedLora(pipeline_class, {component: layers}, {component: config}, header)
