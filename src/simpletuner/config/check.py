"""`simpletuner config check`: what loading cannot see (local paths) and a short summary.

No network: a Hub model id is accepted as written; only values that are, or look like,
local paths (start with / . ~, or exist) are checked on disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from collections.abc import Sequence

from simpletuner.config.conditioning import generator_problems
from simpletuner.config.load import Loaded, Settings, read_settings
from simpletuner.config.packages import missing_packages
from simpletuner.config.references import latent_cache_for, text_cache_for
from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.config.quantisation import missing_libraries
from simpletuner.config.unimplemented import unimplemented_problems

# files that look like images; `scan` decides which ones really are (this only catches an empty folder)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif", ".avif", ".jxl"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


def looks_local(value: str) -> bool:
    """Whether a model reference is meant as a local path rather than a Hub id."""
    return value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value))


def _model_problem(option: str, value: str | None, want_file: bool = False) -> str | None:
    if not value:
        return None
    if looks_local(value):
        path = Path(value).expanduser()
        if not path.exists():
            return f"{option}: {value!r} does not exist"
        if not os.access(path, os.R_OK):
            return f"{option}: {value!r} is not readable"
        return None
    if want_file:
        return f"{option}: file {value!r} does not exist"
    if not _HUB_ID.match(value):
        return f"{option}: {value!r} is neither an existing local path nor a Hub id like org/model"
    return None


def _training_problems(training: TrainingConfig) -> list[str]:
    models = ["pretrained_model_name_or_path", "pretrained_vae_model_name_or_path",
              "pretrained_unet_model_name_or_path", "pretrained_transformer_model_name_or_path",
              "pretrained_t5_model_name_or_path", "controlnet_model_name_or_path", "init_lora"]
    files = ["lycoris_config", "user_prompt_library"]
    if training.webhook_config and not training.webhook_config.lstrip().startswith(("{", "[")):
        files.append("webhook_config")  # else inline JSON
    problems = [_model_problem(name, getattr(training, name)) for name in models]
    problems += [_model_problem(name, getattr(training, name), want_file=True) for name in files]
    if training.model_type == "lora" and training.lora_type == "lycoris" and not training.lycoris_config:
        problems.append("lora_type is lycoris: set lycoris_config to a JSON file with the LyCORIS algorithm")
    return [p for p in problems if p]


def _path_problem(name: str, value: str, folder: bool) -> str | None:
    path = Path(value)
    if not path.exists():
        return f"{name} {value!r} does not exist"
    if folder != path.is_dir():
        return f"{name} {value!r} is not a {'folder' if folder else 'file'}"
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        return f"{name} {value!r} is not readable"
    return None


def _holds_an_image(folder: Path) -> bool:
    """Whether any file under `folder` has an image suffix (stops at the first one found)."""
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES for name in files):
            return True
    return False


def _dataset_problems(dataset: DatasetConfig) -> list[str]:
    """Local sources exist and are readable (paths were made absolute by loading)."""
    if dataset.type != "local" or dataset.dataset_type == "text_embeds":
        return []
    name = f"dataset {dataset.id!r}:"
    problems = []
    if dataset.instance_data_dir:
        problem = _path_problem(f"{name} instance_data_dir", dataset.instance_data_dir, folder=True)
        if problem is None and not _holds_an_image(Path(dataset.instance_data_dir)):
            problem = (f"{name} instance_data_dir {dataset.instance_data_dir!r} holds no image files "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))}), in it or below it")
        problems.append(problem)
    if dataset.parquet is not None and "://" not in dataset.parquet.path:
        problems.append(_path_problem(f"{name} parquet.path", dataset.parquet.path, folder=False))
    if isinstance(dataset.caption_filter_list, str) and "://" not in dataset.caption_filter_list:
        problems.append(_path_problem(f"{name} caption_filter_list", dataset.caption_filter_list, folder=False))
    return [p for p in problems if p]


def _resolution(dataset: DatasetConfig, training: TrainingConfig) -> str:
    value = dataset.resolution if dataset.resolution is not None else training.resolution
    if value is None:
        return "the model family's native resolution"
    kind = dataset.resolution_type or training.resolution_type
    return f"{value:g} ({kind})"


def _dataset_line(dataset: DatasetConfig, settings: Settings) -> str:
    training = settings.training
    if dataset.dataset_type == "text_embeds":
        where = dataset.location() if dataset.type == "aws" else dataset.cache_dir or f"{training.cache_dir}/text/{dataset.id}"
        return f"  {dataset.id} [text_embeds{', default' if dataset.default else ''}]: {where}"
    line = f"  {dataset.id} [{dataset.dataset_type}]: {dataset.location()} at {_resolution(dataset, training)}"
    if dataset.dataset_type == "image":
        text = text_cache_for(dataset, settings.all_datasets, training)
        line += f"\n      text embeds: {text.location} ({text.reason}); latents: {latent_cache_for(dataset, training)}"
    return line


def check_settings(settings: Settings) -> CheckReport:
    """Local paths exist and are readable; every image dataset has a text-embed cache; a summary."""
    training = settings.training
    report = CheckReport()
    report.problems += _training_problems(training)
    report.problems += unimplemented_problems(training, settings.datasets)
    missing, less = missing_packages(training, settings.datasets)
    report.problems += missing
    report.notes += less
    report.problems += missing_libraries(training)
    if "prior_loss_weight" in training.model_fields_set and not any(d.is_class_data for d in settings.datasets):
        report.notes.append("prior_loss_weight is set but no dataset has is_class_data: it weights nothing")
    for dataset in settings.datasets:
        report.problems += _dataset_problems(dataset)
        report.problems += generator_problems(training, dataset)
        if dataset.dataset_type == "image" and not dataset.text_embeds:
            choice = text_cache_for(dataset, settings.all_datasets, training)
            if choice.dataset_id is None:
                report.notes.append(f"dataset {dataset.id!r} has no text_embeds dataset: text embeddings will be "
                                    f"cached under {choice.location}")
        if dataset.dataset_type == "conditioning" and not any(
                d.conditioning_data == dataset.id for d in settings.datasets):
            report.notes.append(f"conditioning dataset {dataset.id!r} is paired with no image dataset "
                                "(set conditioning_data on the image dataset)")
        if dataset.type == "aws":
            report.notes.append(f"dataset {dataset.id!r} is on S3 ({dataset.location()}): not checked (no network)")
        if dataset.type == "huggingface":
            report.notes.append(f"dataset {dataset.id!r} is a Hugging Face dataset ({dataset.location()}): loaded "
                                "by `scan` and `train`, not here")
    report.summary = _summary(settings)
    return report


def _summary(settings: Settings) -> list[str]:
    training = settings.training
    adapter = f"{training.model_type}"
    if training.model_type == "lora":
        adapter += f" ({training.lora_type}, rank {training.lora_rank})"
    steps = (f"{training.max_train_steps} steps" if training.max_train_steps else
             f"{training.num_train_epochs} epochs" if training.num_train_epochs else "no max_train_steps or "
             "num_train_epochs set")
    lines = [
        f"configuration: {settings.config_path or '(command line)'}",
        f"model: {training.model_family}, {adapter}",
        f"base model: {training.pretrained_model_name_or_path}",
        f"training: batch {training.train_batch_size} x accumulation {training.gradient_accumulation_steps}, "
        f"learning rate {training.learning_rate:g} ({training.lr_scheduler}), {steps}, {training.mixed_precision}",
        f"datasets: {settings.datasets_path}",
    ]
    lines += [_dataset_line(d, settings) for d in settings.datasets]
    if settings.disabled_datasets:
        lines.append(f"  disabled: {', '.join(d.id for d in settings.disabled_datasets)}")
    lines += [f"cache: {training.cache_dir}", f"output: {training.output_dir}"]
    return lines


def check_file(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[CheckReport, Loaded]:
    """Every problem of a configuration in one round: training options, the dataset file, references between
    datasets, local paths and features not built yet; the summary when the configuration loads."""
    loaded = read_settings(path, overrides)
    if not loaded.problems:
        return check_settings(loaded.settings()), loaded
    report = CheckReport(problems=list(loaded.problems))
    if loaded.training is not None:
        report.problems += _training_problems(loaded.training)
        report.problems += missing_packages(loaded.training, loaded.datasets)[0]
    report.problems += unimplemented_problems(loaded.partial_training(), loaded.datasets)
    for dataset in loaded.datasets:
        report.problems += _dataset_problems(dataset)
    return report, loaded
