"""Model families by name. A new family is one module and one line here.

Families are imported on demand, so naming one does not import the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
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
