"""Optional packages a configuration needs, found without importing them.

`config check` and the start of `train` ask here, so a missing extra is one clear line
before any long work, not a traceback after scanning and caching. Lookups use
`importlib.util.find_spec` on top-level names: nothing heavy is imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig

_OPTIMIZERS = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt"),
               "lion": ("lion_pytorch", "lion-pytorch"), "adamw_schedulefree": ("schedulefree", "schedulefree")}


@dataclass(frozen=True)
class Need:
    """A package the configuration needs, and why."""

    module: str  # top-level import name
    install: str  # what to pip install
    reason: str  # the setting that needs it
    without: str = ""  # set: training runs without it, with less (a note, not a problem): what is lost

    def message(self) -> str:
        if not self.without:
            return f"{self.reason} needs the {self.module!r} package, which is not installed: `pip install {self.install}`"
        return f"{self.reason}, but {self.module!r} is not installed: {self.without} (`pip install {self.install}`)"


def _s3_locations(training: TrainingConfig, datasets: list[DatasetConfig]) -> list[str]:
    found = [f"dataset {d.id!r} (type aws)" for d in datasets if d.type == "aws"]
    found += [f"dataset {d.id!r} ({name} {value})" for d in datasets
              for name, value in (("cache_dir", d.cache_dir), ("cache_dir_vae", d.cache_dir_vae))
              if isinstance(value, str) and value.startswith("s3://")]
    if str(training.cache_dir).startswith("s3://"):
        found.append(f"cache_dir {training.cache_dir}")
    return found


def needed(training: TrainingConfig, datasets: list[DatasetConfig]) -> list[Need]:
    """Every optional package the configuration asks for."""
    needs = []
    if training.lora_type == "lycoris" and training.model_type.endswith("lora"):
        needs.append(Need("lycoris", "lycoris-lora", "lora_type='lycoris'"))
    if training.optimizer in _OPTIMIZERS:
        module, install = _OPTIMIZERS[training.optimizer]
        needs.append(Need(module, install, f"optimizer={training.optimizer!r}"))
    if training.report_to == "wandb":
        needs.append(Need("wandb", "wandb", "report_to='wandb'"))
    if training.report_to == "tensorboard":
        needs.append(Need("tensorboard", "tensorboard", "report_to='tensorboard' (the default)",
                          without="no metrics will be recorded (metrics.jsonl still is)"))
    needs += [Need("s3fs", "s3fs", f"{where} on S3") for where in _s3_locations(training, datasets)[:1]]
    return needs


def missing_packages(training: TrainingConfig, datasets: list[DatasetConfig]) -> tuple[list[str], list[str]]:
    """(problems, notes): one line per needed package that is not installed."""
    missing = [need for need in needed(training, datasets) if importlib.util.find_spec(need.module) is None]
    return [n.message() for n in missing if not n.without], [n.message() for n in missing if n.without]


def check_packages(training: TrainingConfig, datasets: list[DatasetConfig]) -> None:
    """Raise one ConfigError naming every required package that is missing."""
    problems, _ = missing_packages(training, datasets)
    if problems:
        raise ConfigError("; ".join(problems))
