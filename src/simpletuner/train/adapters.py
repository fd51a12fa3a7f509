"""What trains: the full model, a peft LoRA, or a LyCORIS network, on any nn.Module.

`prepare_trainable` freezes what must not train and returns a `Trained`: the parameters for
the optimiser, the module whose trainable parameters checkpoints hold, and how to export it.
A LoRA leaves training as a `TrainedLora` (its weights in peft's names, its configuration), from
which `simpletuner.publish` writes the LoRA files; `merge_lora` fuses one into a model. LyCORIS
exports in LyCORIS's own format (loaded through `lycoris`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from simpletuner.atomic import written_atomically
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
    text_encoders: dict[str, nn.Module] = field(default_factory=dict)  # train_text_encoder: component -> encoder

    def parameters(self) -> list[nn.Parameter]:
        modules = [self.module, *self.text_encoders.values()]
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    @contextmanager
    def base_model(self) -> Iterator[nn.Module]:
        """The base model's own predictions while inside: the adapter switched off, then on again.

        Regularisation data (is_regularisation_data) take these predictions as their targets. Full
        training has no base to switch back to.
        """
        if self.kind == "full":
            raise ConfigError(REGULARISATION_NEEDS_ADAPTER.format(dataset="a dataset", model_type="full"))
        if self.kind == "lycoris":
            multiplier = getattr(self.module, "multiplier", 1.0)
            self.module.set_multiplier(0.0)
            try:
                yield self.model
            finally:
                self.module.set_multiplier(multiplier)
            return
        self.model.disable_adapters()
        try:
            yield self.model
        finally:
            self.model.enable_adapters()

    def cast_trainable(self, dtype: torch.dtype) -> None:
        """Store the trainable parameters (only) in `dtype`; frozen weights keep theirs."""
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.data = parameter.data.to(dtype)


REGULARISATION_NEEDS_ADAPTER = (
    "{dataset}: is_regularisation_data needs an adapter (model_type 'lora', LoRA or LyCORIS), but model_type is "
    "{model_type!r}: a regularisation sample's target is the base model's prediction with the adapter switched off, "
    "and full training changes the base model itself; remove one of the two")


def check_regularisation(cfg: Any, datasets: Sequence[Any]) -> None:
    """Regularisation datasets need an adapter to switch off: refuse them in full training, naming both options."""
    for dataset in datasets:
        if dataset.is_regularisation_data and "lora" not in cfg.model_type:
            raise ConfigError(REGULARISATION_NEEDS_ADAPTER.format(dataset=f"dataset {dataset.id!r}",
                                                                  model_type=cfg.model_type))
        if dataset.is_regularisation_data and cfg.train_text_encoder:
            raise ConfigError(f"dataset {dataset.id!r}: is_regularisation_data cannot be combined with "
                              "train_text_encoder=true: the base model's prediction would read the trained text "
                              "encoders' outputs; remove one of the two")


def prepare_trainable(
    model: nn.Module,
    cfg: Any,
    target_modules: Sequence[str],
    *,
    prefix: str | None = "unet",
    lycoris_targets: Sequence[str] = DEFAULT_LYCORIS_TARGETS,
    exclude_modules: Sequence[str] = (),
) -> Trained:
    """Make `model` train as `cfg` says (model_type, lora_type, lora_*, init_lora, lycoris_config).

    `target_modules`: peft target module names for standard LoRA (the family's preset);
    `prefix`: the component's key prefix in LoRA files (unet, transformer, text_encoder), used
    to pick its weights from an init_lora file; `lycoris_targets`: module class names LyCORIS
    adapts when lycoris_config has no apply_preset; `exclude_modules`: module paths the LoRA leaves out
    although a target names them (fuse_qkv_projections: the projections the fused layers hold).
    """
    if "lora" not in cfg.model_type:
        if getattr(cfg, "layer_freeze_strategy", "none") == "bitfit":
            return Trained("full", freeze_all_but_biases(model), model)
        model.requires_grad_(True)
        return Trained("full", model, model)
    if cfg.lora_type == "lycoris":
        if not cfg.lycoris_config:
            raise ConfigError("lora_type='lycoris' needs lycoris_config: a JSON file with at least "
                              '{"algo": "lokr"} (and optionally factor, linear_dim, linear_alpha, apply_preset)')
        config = load_lycoris_config(cfg.lycoris_config)
        excluded: list[str] = []
        if exclude_modules:  # fuse_qkv_projections: the fused layers' projections
            from simpletuner.train.fusion import check_lycoris_split, lycoris_excluded

            check_lycoris_split(config)
            excluded = lycoris_excluded(exclude_modules, config)
        network = apply_lycoris(model, config, targets=lycoris_targets, init_norm=cfg.init_lokr_norm,
                                exclude=excluded)
        if cfg.init_lora:
            load_lycoris_weights(network, cfg.init_lora)
        return Trained("lycoris", model, network)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
               target_modules=target_modules, init=cfg.lora_init_type, exclude_modules=exclude_modules)
    if cfg.init_lora:
        load_lora_into(model, cfg.init_lora, prefix=prefix)
    return Trained("lora", model, model)


def freeze_all_but_biases(model: nn.Module) -> nn.Module:
    """BitFit (Ben Zaken et al. 2021): only the bias parameters train; returns `model`."""
    model.requires_grad_(False)
    biases = [parameter for name, parameter in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise ConfigError(f"layer_freeze_strategy='bitfit': {type(model).__name__} has no bias parameters to train")
    for parameter in biases:
        parameter.requires_grad_(True)
    return model


# -------------------------------------------------------------------------------------- LoRA


def lora_config(*, rank: int, alpha: float | None = None, dropout: float = 0.0, use_dora: bool = False,
                target_modules: Sequence[str], init: str = "default", exclude_modules: Sequence[str] = ()) -> Any:
    """The peft LoraConfig of a run's LoRA (alpha defaults to the rank: scale 1)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      use_dora=use_dora, target_modules=list(target_modules),
                      exclude_modules=list(exclude_modules) or None,
                      init_lora_weights=True if init == "default" else init)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_dora: bool = False,
    target_modules: Sequence[str],
    init: str = "default",
    exclude_modules: Sequence[str] = (),
) -> nn.Module:
    """Freeze `model` and add a peft LoRA adapter ("default") to the named modules (less `exclude_modules`);
    return `model`."""
    if not target_modules:
        raise ConfigError("LoRA needs target modules; the model family gave none")
    config = lora_config(rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora,
                         target_modules=target_modules, init=init, exclude_modules=exclude_modules)
    add_lora_adapter(model, config)
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def add_lora_adapter(model: nn.Module, config: Any) -> None:
    """Freeze `model` and inject a peft LoRA adapter named "default" built from `config`."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter") and not _is_transformers_model(model):  # diffusers' peft bookkeeping
            model.add_adapter(config)
        else:  # transformers 5's add_adapter asks for a newer peft than this environment's: peft injects it
            inject_adapter_in_model(config, model)
            model.peft_config = {"default": config}  # where peft's state-dict helpers look for it
    except ValueError as error:
        raise ConfigError(f"LoRA target modules {sorted(config.target_modules)} do not fit "
                          f"{type(model).__name__}: {error}") from error


@dataclass
class TrainedLora:
    """A trained LoRA in diffusers' module names: what every LoRA file format is written from.

    `layers`: pipeline component (unet, transformer, text_encoder, ...) -> its adapter weights in peft's
    names without the component prefix (`<module>.lora_A.weight`, `<module>.lora_B.weight`, and
    `<module>.lora_magnitude_vector` for DoRA); `configs`: component -> the peft LoraConfig as a dict
    (rank, alpha, DoRA, targets); `metadata`: the file header entries (publish.metadata).
    Formats that need more of the base model than the LoRA read it from `model_configs` (component ->
    the model's config, e.g. a UNet's block layout) and `base_weights` (component -> `<module>` -> the
    frozen weight a DoRA module wraps); `from_models` fills both, a LoRA read back from a file has neither.
    """

    pipeline_class: str
    layers: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)
    model_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_models(cls, pipeline_class: str, models: Mapping[str, nn.Module],
                    metadata: Mapping[str, str] | None = None) -> TrainedLora:
        """A copy, on the CPU, of the adapters ("default") of `models` (component name -> model carrying a
        peft LoRA)."""
        from peft import get_peft_model_state_dict

        layers = {name: {key: value.detach().to("cpu", copy=True).contiguous()  # a copy: never the live weights
                         for key, value in get_peft_model_state_dict(model).items()}
                  for name, model in models.items()}
        configs = {name: _jsonable_config(model.peft_config["default"].to_dict()) for name, model in models.items()}
        model_configs = {name: dict(model.config) for name, model in models.items()
                         if isinstance(getattr(model, "config", None), Mapping)}
        bases = {name: dora_base_weights(model) for name, model in models.items()
                 if configs[name].get("use_dora")}
        return cls(pipeline_class, layers, configs, dict(metadata or {}), model_configs, bases)

    def uses_dora(self) -> bool:
        return any(config.get("use_dora") for config in self.configs.values())

    def modules(self, component: str) -> list[str]:
        """The adapted modules of a component, by name."""
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.layers[component]})

    def alpha(self, component: str, module: str) -> float:
        """The alpha a module trained with (peft's alpha_pattern, else lora_alpha)."""
        config = self.configs[component]
        return float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))

    def rank(self, component: str, module: str) -> int:
        config = self.configs[component]
        return int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))


def dora_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module>` -> the frozen base weight of each of the model's LoRA layers (not copied: it never
    changes while the adapter trains)."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_base_layer().weight.detach() for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A}


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rule: a pattern applies when the module name ends with it (on a dot boundary)."""
    for pattern, value in patterns.items():
        if module == pattern or module.endswith(f".{pattern}"):
            return value
    return default


def _jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({key: sorted(value) if isinstance(value, set) else value
                                  for key, value in config.items()}, default=str))


def merge_lora(model: nn.Module, layers: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> nn.Module:
    """Fuse a LoRA (peft-named weights and its LoraConfig as a dict) into `model`'s weights, leaving a
    plain model with no adapter layers; every weight must find its module."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = LoraConfig(**{key: value for key, value in config.items() if key in LoraConfig.__dataclass_fields__})
    add_lora_adapter(model, lora)
    result = set_peft_model_state_dict(model, dict(layers), adapter_name="default")
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    missing = [key for key in result.missing_keys if "lora_" in key]
    if unexpected or missing:
        raise UserError(f"the LoRA does not fit {type(model).__name__}: {len(unexpected)} weights have no module, "
                        f"{len(missing)} adapter weights are missing, e.g. {(unexpected or missing)[0]}")
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    return model


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
    from simpletuner.train.fusion import fuse_lora_weights, fused_part_rows

    rows = fused_part_rows(model)  # fuse_qkv_projections: the file's q, k and v adapters join on the fused layers
    if rows:
        saved = fuse_lora_weights(saved, rows)
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
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Freeze `model`, wrap it with a LyCORIS network made from `config` and return the network
    (its parameters are what train; move it with the model). `exclude`: LyCORIS exclude_name patterns added to
    the preset's (LyCORIS keeps presets in class state: each network sets its own, empty or not)."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its INFO lines would flood the console
    settings = dict(config)
    algo = settings.pop("algo")
    preset = dict(settings.pop("apply_preset", None) or {"target_module": list(targets)})
    preset["exclude_name"] = [*preset.get("exclude_name", []), *exclude]
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


def save_lycoris_weights(directory: str | Path, network: nn.Module, config: Mapping[str, Any] | None = None,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """Write the LyCORIS network to `pytorch_lora_weights.safetensors` (LyCORIS format), with `metadata`
    and the lycoris_config in its header; written under a temporary name, made 0644, then renamed."""
    path = Path(directory) / LORA_WEIGHTS
    dtype = next(network.parameters()).dtype
    header = {**(metadata or {}), **({"lycoris_config": json.dumps(dict(config))} if config else {})}
    with written_atomically(path, mode=0o644) as temp:
        network.save_weights(str(temp), dtype, header or None)
    return path
