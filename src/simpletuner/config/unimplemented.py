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
    "train_text_encoder": "text-encoder training",
    "text_encoder_lr": "text-encoder training",
    "layer_freeze_strategy": "bias-only (BitFit) training",
    "base_model_precision": "quantised base models",
    "text_encoder_1_precision": "quantised text encoders",
    "text_encoder_2_precision": "quantised text encoders",
    "text_encoder_3_precision": "quantised text encoders",
    "text_encoder_4_precision": "quantised text encoders",
    "lr_end": "a final learning rate for polynomial, sine and cosine schedules",
    "input_perturbation_steps": "input perturbation limited to the first steps",
    "ema_validation": "validation with EMA weights (validation uses the trained weights)",
    "validation_guidance_rescale": "guidance rescale in validation",
    "validation_no_cfg_until_timestep": "skipping guidance in early validation steps",
    "validation_randomize": "random validation seeds",
    "validation_torch_compile": "compiled validation pipelines",
    "validation_lycoris_strength": "LyCORIS strength in validation",
    "push_to_hub": "uploading to the Hugging Face Hub",
    "push_checkpoints_to_hub": "uploading to the Hugging Face Hub",
    "model_card_note": "model cards",
    "model_card_safe_for_work": "model cards",
    "webhook_config": "webhook notifications",
    "webhook_reporting_interval": "webhook notifications",
}
DATASET: dict[str, str] = {
    "is_regularisation_data": "prior-preservation (regularisation) training",
    "conditioning_data": "masked loss (conditioning_data without controlnet=true)",
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
    for dataset in datasets:
        problems += [f"dataset {dataset.id!r}: {name} = {value!r}: {feature} is not implemented in this version "
                     "yet; remove the option" for name, value, feature in _set(dataset, DATASET)
                     if not (name == "conditioning_data" and getattr(training, "controlnet", False))]
    return problems


def check_implemented(training: TrainingConfig, datasets: list[DatasetConfig]) -> None:
    """Raise ConfigError listing every option whose feature this version does not do yet."""
    problems = unimplemented_problems(training, datasets)
    if problems:
        raise ConfigError("the configuration asks for features this version does not have yet:\n  "
                          + "\n  ".join(problems))
