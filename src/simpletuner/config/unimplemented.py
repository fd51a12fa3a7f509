"""Options the schema accepts (SimpleTuner's names, documented) whose feature this version does not do yet.

Setting one to anything but its default is an error naming the option, never a
silent no-op (an option in ONLY_WHEN only when the setting it depends on reads it).
Remove an entry here in the commit that implements it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig

# option -> the feature it belongs to
TRAINING: dict[str, str] = {
    "lr_end": "a final learning rate for polynomial, sine and cosine schedules",
    "input_perturbation_steps": "input perturbation limited to the first steps",
    "ema_validation": "validation with EMA weights (validation uses the trained weights)",
    "validation_guidance_rescale": "guidance rescale in validation",
    "validation_no_cfg_until_timestep": "skipping guidance in early validation steps",
    "validation_randomize": "random validation seeds",
    "validation_torch_compile": "compiled validation pipelines",
    "validation_lycoris_strength": "LyCORIS strength in validation",
}
DATASET: dict[str, str] = {
    "conditioning_data": "conditioning data without controlnet=true (masks, conditioning_type 'mask', are built)",
}


# Options that matter only under another setting: set alone they ask for nothing this version lacks.
# (lr_end: SimpleTuner reads it only in these schedules.)
ONLY_WHEN: dict[str, Callable[[TrainingConfig], bool]] = {
    "lr_end": lambda t: t.lr_scheduler in ("polynomial", "sine", "cosine", "cosine_with_restarts"),
}


def _set(model: TrainingConfig | DatasetConfig, names: dict[str, str]) -> list[tuple[str, object, str]]:
    fields = type(model).model_fields
    return [(name, getattr(model, name), feature) for name, feature in names.items()
            if name in fields and getattr(model, name) != fields[name].default
            and ONLY_WHEN.get(name, lambda _: True)(model)]


def unimplemented_problems(training: TrainingConfig, datasets: list[DatasetConfig]) -> list[str]:
    """One line per option set to a feature this version does not do yet."""
    problems = [f"{name} = {value!r}: {feature} is not implemented in this version yet; remove the option"
                for name, value, feature in _set(training, TRAINING)]
    masks = {dataset.id for dataset in datasets if dataset.conditioning_type == "mask"}
    for dataset in datasets:
        problems += [f"dataset {dataset.id!r}: {name} = {value!r}: {feature} is not implemented in this version "
                     "yet; remove the option" for name, value, feature in _set(dataset, DATASET)
                     if not (name == "conditioning_data"
                             and (getattr(training, "controlnet", False) or value in masks))]
    return problems


def check_implemented(training: TrainingConfig, datasets: list[DatasetConfig]) -> None:
    """Raise ConfigError listing every option whose feature this version does not do yet."""
    problems = unimplemented_problems(training, datasets)
    if problems:
        raise ConfigError("the configuration asks for features this version does not have yet:\n  "
                          + "\n  ".join(problems))
