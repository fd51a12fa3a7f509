"""Model families by name. A new family is one module and one line here.

Families are imported on demand, so naming one does not import the others.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import import_module
from typing import TYPE_CHECKING

from simpletuner.errors import ConfigError
from simpletuner.models.flavours import BY_FAMILY

if TYPE_CHECKING:
    from simpletuner.config.load import Settings
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import ModelFamily

# model_family value -> "module:Class"
FAMILIES: dict[str, str] = {
    "legacy": "simpletuner.models.sd:StableDiffusionFamily",
    "sd1x": "simpletuner.models.sd:SD1Family",
    "sd2x": "simpletuner.models.sd:SD2Family",
    "sdxl": "simpletuner.models.sdxl:SDXLFamily",
    "sdxl_refiner": "simpletuner.models.sdxl:SDXLRefinerFamily",
    "sd3": "simpletuner.models.sd3:SD3Family",
    "flux": "simpletuner.models.flux:FluxFamily",
    "pixart_sigma": "simpletuner.models.pixart:PixArtSigmaFamily",
    "kolors": "simpletuner.models.kolors:KolorsFamily",
    "deepfloyd": "simpletuner.models.deepfloyd:DeepFloydFamily",
    "hunyuan_dit": "simpletuner.models.hunyuandit:HunyuanDiTFamily",
}


def family_names() -> list[str]:
    """Every registered model_family value."""
    return sorted(FAMILIES)


def get_family(name: str) -> ModelFamily:
    """A fresh instance of the family registered under `name` (a model_family value)."""
    if name not in FAMILIES:
        raise ConfigError(f"model_family {name!r} is not available; choose one of {', '.join(family_names())}")
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(import_module(module), attr)()


def flavour_problem(training: TrainingConfig) -> str | None:
    """Why the model choice cannot be resolved to a checkpoint (flavour refused or unknown, none given), or None."""
    family, flavour = getattr(training, "model_family", None), training.model_flavour
    if not isinstance(family, str) or family not in BY_FAMILY or not isinstance(flavour, (str, type(None))):
        return None  # unvalidated options (config check of a file with other problems): those are reported
    table = BY_FAMILY[family]
    problem = table.problem(training.model_family, training.model_flavour)
    no_checkpoint = table.checkpoint(training.model_flavour) is None
    if problem is None and not training.pretrained_model_name_or_path and no_checkpoint:
        problem = (f"model_family {training.model_family!r} has no default checkpoint: set model_flavour (one of "
                   f"{', '.join(table.checkpoints)}) or pretrained_model_name_or_path")
    return problem


def resolve_checkpoint(training: TrainingConfig) -> TrainingConfig:
    """`training` with pretrained_model_name_or_path set: as given, else the Hub checkpoint of model_flavour (or of
    the family's default flavour), as SimpleTuner chooses it. Raises ConfigError when there is none."""
    problem = flavour_problem(training)
    if problem:
        raise ConfigError(problem)
    if training.pretrained_model_name_or_path:
        return training
    checkpoint = BY_FAMILY[training.model_family].checkpoint(training.model_flavour)
    return training.model_copy(update={"pretrained_model_name_or_path": checkpoint})


def with_checkpoint(settings: Settings) -> Settings:
    """`settings` whose training options name the checkpoint (see `resolve_checkpoint`)."""
    training = resolve_checkpoint(settings.training)
    return settings if training is settings.training else replace(settings, training=training)
