"""What trains: the full model, a peft LoRA, or a LyCORIS network, on any nn.Module.

`prepare_trainable` freezes what must not train and returns a `Trained`: the parameters for
the optimiser, the module whose trainable parameters checkpoints hold, and how to export it.
LoRA exports in diffusers' format (`pytorch_lora_weights.safetensors`, loaded by a pipeline's
`load_lora_weights`); LyCORIS exports in LyCORIS's own format (loaded through `lycoris`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from simpletuner.errors import ConfigError, UserError
from simpletuner.log import get_logger

logger = get_logger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
DEFAULT_LYCORIS_TARGETS = ("Attention", "FeedForward")  # diffusers UNet classes; Flux needs its block classes


@dataclass
class Trained:
    """One module made trainable.

    `module` is what checkpoints save (its parameters that require grad): the model itself for
    full and LoRA training, the LyCORIS network for LyCORIS. `model` is the (patched) base model.
    """

    kind: Literal["full", "lora", "lycoris"]
    model: nn.Module
    module: nn.Module

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def cast_trainable(self, dtype: torch.dtype) -> None:
        """Store the trainable parameters (only) in `dtype`; frozen weights keep theirs."""
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.data = parameter.data.to(dtype)


def prepare_trainable(
    model: nn.Module,
    cfg: Any,
    target_modules: Sequence[str],
    *,
    prefix: str | None = "unet",
    lycoris_targets: Sequence[str] = DEFAULT_LYCORIS_TARGETS,
) -> Trained:
    """Make `model` train as `cfg` says (model_type, lora_type, lora_*, init_lora, lycoris_config).

    `target_modules`: peft target module names for standard LoRA (the family's preset);
    `prefix`: the component's key prefix in LoRA files (unet, transformer, text_encoder), used
    to pick its weights from an init_lora file; `lycoris_targets`: module class names LyCORIS
    adapts when lycoris_config has no apply_preset.
    """
    if "lora" not in cfg.model_type:
        model.requires_grad_(True)
        return Trained("full", model, model)
    if cfg.lora_type == "lycoris":
        if not cfg.lycoris_config:
            raise ConfigError("lora_type='lycoris' needs lycoris_config: a JSON file with at least "
                              '{"algo": "lokr"} (and optionally factor, linear_dim, linear_alpha, apply_preset)')
        network = apply_lycoris(model, load_lycoris_config(cfg.lycoris_config), targets=lycoris_targets,
                                init_norm=cfg.init_lokr_norm)
        if cfg.init_lora:
            load_lycoris_weights(network, cfg.init_lora)
        return Trained("lycoris", model, network)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
               target_modules=target_modules, init=cfg.lora_init_type)
    if cfg.init_lora:
        load_lora_into(model, cfg.init_lora, prefix=prefix)
    return Trained("lora", model, model)


# -------------------------------------------------------------------------------------- LoRA


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_dora: bool = False,
    target_modules: Sequence[str],
    init: str = "default",
) -> nn.Module:
    """Freeze `model` and add a peft LoRA adapter ("default") to the named modules; return `model`."""
    from peft import LoraConfig, inject_adapter_in_model

    if not target_modules:
        raise ConfigError("LoRA needs target modules; the model family gave none")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        use_dora=use_dora, target_modules=list(target_modules),
                        init_lora_weights=True if init == "default" else init)
    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter"):  # diffusers and transformers models keep their peft bookkeeping
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
    except ValueError as error:
        raise ConfigError(f"LoRA target modules {list(target_modules)} do not fit {type(model).__name__}: "
                          f"{error}") from error
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA format (no component prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora_weights(directory: str | Path, pipeline_class: Any, components: Mapping[str, nn.Module]) -> Path:
    """Write `pytorch_lora_weights.safetensors` through the pipeline class's `save_lora_weights`.

    `components`: pipeline component name (unet, transformer, text_encoder, text_encoder_2) ->
    model carrying a peft LoRA. The adapter configuration (rank, alpha, DoRA) travels in the file.
    """
    if isinstance(pipeline_class, str):
        import diffusers

        pipeline_class = getattr(diffusers, pipeline_class)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for name, model in components.items():
        kwargs[f"{name}_lora_layers"] = lora_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    pipeline_class.save_lora_weights(directory, weight_name=LORA_WEIGHTS, safe_serialization=True, **kwargs)
    return directory / LORA_WEIGHTS


def load_lora_into(model: nn.Module, file: str | Path, *, prefix: str | None = "unet") -> None:
    """Start the model's LoRA adapter from the weights in a diffusers/peft LoRA file.

    Takes the keys under `prefix.` (all keys when the file has no prefixes or prefix is None).
    Every adapter weight of the model must be in the file, with the same shape.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(file)
    if not path.is_file():
        raise UserError(f"init_lora={str(file)!r}: no such file")
    saved = load_file(str(path))
    if prefix and any(k.startswith(f"{prefix}.") for k in saved):
        saved = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(f"{prefix}.")}
    saved = convert_unet_state_dict_to_peft(saved)
    wanted = get_peft_model_state_dict(model)
    missing = sorted(set(wanted) - set(saved))
    wrong = sorted(n for n in set(wanted) & set(saved) if wanted[n].shape != saved[n].shape)
    if missing or wrong:
        example = (missing or wrong)[0]
        raise UserError(f"init_lora={str(file)!r} does not fit this LoRA (lora_rank, use_dora and the target "
                        f"modules must match the file's): {len(missing)} weights missing, {len(wrong)} of "
                        f"another shape, e.g. {example}")
    result = set_peft_model_state_dict(model, saved, adapter_name="default")
    if result.unexpected_keys:
        logger.warning("init_lora %s: %d weights ignored, e.g. %s", file, len(result.unexpected_keys),
                       result.unexpected_keys[0])


# ----------------------------------------------------------------------------------- LyCORIS


def load_lycoris_config(path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"lycoris_config={str(path)!r}: cannot read it: {error}") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"lycoris_config={str(path)!r}: not valid JSON: {error}") from error
    if not isinstance(config, dict) or "algo" not in config:
        raise ConfigError(f"lycoris_config={str(path)!r} must be a JSON object with an 'algo' key "
                          "(lokr, loha, lora, locon, ...)")
    return config


def apply_lycoris(
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    targets: Sequence[str] = DEFAULT_LYCORIS_TARGETS,
    init_norm: float | None = None,
) -> nn.Module:
    """Freeze `model`, wrap it with a LyCORIS network made from `config` and return the network
    (its parameters are what train; move it with the model)."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its INFO lines would flood the console
    settings = dict(config)
    algo = settings.pop("algo")
    preset = settings.pop("apply_preset", None) or {"target_module": list(targets)}
    if init_norm is not None:
        settings.setdefault("init_lokr_norm", init_norm)
    model.requires_grad_(False)
    LycorisNetwork.apply_preset(preset)
    network = create_lycoris(model, settings.pop("multiplier", 1.0), linear_dim=settings.pop("linear_dim", 4),
                             linear_alpha=settings.pop("linear_alpha", 1), algo=algo, **settings)
    network.apply_to()
    if not any(True for _ in network.parameters()):
        raise ConfigError(f"lycoris_config: no module of {type(model).__name__} matched the targets {preset}")
    return network


def load_lycoris_weights(network: nn.Module, file: str | Path) -> None:
    if not Path(file).is_file():
        raise UserError(f"init_lora={str(file)!r}: no such file")
    network.load_weights(str(file))


def save_lycoris_weights(directory: str | Path, network: nn.Module, config: Mapping[str, Any] | None = None) -> Path:
    """Write the LyCORIS network to `pytorch_lora_weights.safetensors` (LyCORIS format)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LORA_WEIGHTS
    dtype = next(network.parameters()).dtype
    metadata = {"lycoris_config": json.dumps(dict(config))} if config else None
    network.save_weights(str(path), dtype, metadata)
    return path
