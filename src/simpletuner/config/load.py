"""Load a training configuration and its datasets from files and command-line overrides.

    settings = load_settings("config/config.json", ["--learning_rate", "1e-4"])
    settings.training.learning_rate, settings.datasets

Precedence: command-line overrides > the configuration file > the schema's defaults.
Datasets come from the file named by `data_backend_config` (SimpleTuner's
multidatabackend.json; a relative path is looked up beside the configuration file first,
then in the working directory, as SimpleTuner does), or from `[[datasets]]` tables in a
TOML configuration. A local dataset's relative paths (instance_data_dir, parquet.path, a
caption_filter_list file) are resolved the same way against the dataset file's folder, so
loaded datasets carry absolute local paths. Training options naming files or model folders
(TRAINING_PATHS) become absolute when they exist beside the configuration file; otherwise
they stay as written (a Hub id, or a path from the working directory). Cache and output
folders stay as written: relative to the working directory, as in SimpleTuner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpletuner.config.arguments import parse_arguments
from simpletuner.config.compat import (
    ALIASES, DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED, IGNORED, UNSUPPORTED, translate_legacy,
)
from simpletuner.config.files import RawConfig, parse_json, read_config_file
from simpletuner.config.references import reference_problems
from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.config.validate import Compat, validate
from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

logger = get_logger(__name__)

TRAINING_COMPAT = Compat(ALIASES, IGNORED, UNSUPPORTED, command_line=True)
DATASET_COMPAT = Compat(DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED)
DEFAULT_DATASET_FILE = "multidatabackend.json"
MAX_LISTED = 25  # problems listed one by one in an error; the rest are counted


@dataclass(frozen=True)
class Settings:
    """Everything a run is configured by, and where it came from."""

    training: TrainingConfig
    datasets: list[DatasetConfig]  # enabled entries, in file order
    disabled_datasets: list[DatasetConfig] = field(default_factory=list)
    config_path: Path | None = None
    datasets_path: Path | None = None  # the dataset file, or the TOML file holding [[datasets]]
    warnings: list[str] = field(default_factory=list)

    @property
    def all_datasets(self) -> list[DatasetConfig]:
        return self.datasets + self.disabled_datasets


def problem_list(problems: list[str], subject: str) -> str:
    """'SUBJECT: problem' on one line, or 'N problems in SUBJECT:' and the first MAX_LISTED of them, one per
    line (the rest counted)."""
    if len(problems) == 1:
        return f"{subject}: {problems[0]}"
    count = f"{len(problems)} problems"
    listed = [f"  - {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        listed.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return f"{count} in {subject}:\n" + "\n".join(listed)


def _fail(problems: list[str], subject: str) -> None:
    if problems:
        raise ConfigError(problem_list(problems, subject))


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        logger.warning(warning)


def read_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> RawConfig:
    """The options of `path` with `overrides` applied on top, old SimpleTuner switches translated."""
    raw = read_config_file(path) if path is not None else RawConfig()
    raw.update(parse_arguments(list(overrides)), "command line")
    raw.warnings.extend(translate_legacy(raw.values, raw.sources))
    return raw


def _subject(raw: RawConfig) -> str:
    return f"configuration {raw.path}" if raw.path else "configuration (command line)"


def _training(raw: RawConfig) -> tuple[TrainingConfig, list[str]]:
    origin = str(raw.path) if raw.path else "command line"
    outcome = validate(TrainingConfig, raw.values, raw.sources, TRAINING_COMPAT, origin)
    _fail(outcome.problems, _subject(raw))
    if not isinstance(outcome.model, TrainingConfig):  # validate() returns a model or problems; never neither
        raise ConfigError(f"{_subject(raw)}: the options could not be validated")
    training = _with_config_relative_paths(outcome.model, raw.path.parent if raw.path else None)
    return training, raw.warnings + outcome.warnings


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Validated training options from a file (TOML, JSON, config.json, config.env) and overrides."""
    training, warnings = _training(read_raw(path, overrides))
    _warn(warnings)
    return training


def resolve_beside(value: str | Path, base_dir: Path | None) -> Path:
    """A relative path: beside `base_dir` if it exists there, else in the working directory if it exists
    there, else (to be reported as missing) beside `base_dir`."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = ([base_dir / path] if base_dir is not None else []) + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0].absolute()


def _read_dataset_file(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"dataset file not found: {path} (data_backend_config)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read dataset file {path}: {error}") from None
    entries = parse_json(text, path)
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: a dataset file is a JSON list of dataset entries ([{{...}}, ...]), "
                          f"not {type(entries).__name__}")
    return entries


def _entry_name(entry: Any, index: int) -> str:
    if isinstance(entry, dict) and isinstance(entry.get("id"), str):
        return f"dataset {entry['id']!r}"
    return f"dataset entry {index + 1}"


def _is_url(value: str) -> bool:
    return "://" in value


def _with_local_paths(dataset: DatasetConfig, base_dir: Path) -> DatasetConfig:
    """Relative local paths of a dataset entry made absolute (see `resolve_beside`)."""
    if dataset.type != "local":
        return dataset  # an S3 dataset's paths live in its bucket
    update: dict[str, Any] = {}
    if dataset.instance_data_dir:
        update["instance_data_dir"] = str(resolve_beside(dataset.instance_data_dir, base_dir))
    if dataset.parquet is not None and not _is_url(dataset.parquet.path):
        update["parquet"] = dataset.parquet.model_copy(
            update={"path": str(resolve_beside(dataset.parquet.path, base_dir))})
    if isinstance(dataset.caption_filter_list, str) and not _is_url(dataset.caption_filter_list):
        update["caption_filter_list"] = str(resolve_beside(dataset.caption_filter_list, base_dir))
    return dataset.model_copy(update=update) if update else dataset


# Options naming files or model folders; relative ones found beside the configuration file become absolute
# (otherwise they stay as written: a Hub id, or a path from the working directory).
TRAINING_PATHS = (
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "pretrained_unet_model_name_or_path",
    "pretrained_transformer_model_name_or_path", "pretrained_t5_model_name_or_path",
    "controlnet_model_name_or_path", "init_lora", "lycoris_config", "user_prompt_library", "webhook_config",
)


def _with_config_relative_paths(training: TrainingConfig, base_dir: Path | None) -> TrainingConfig:
    if base_dir is None:
        return training
    update = {}
    for name in TRAINING_PATHS:
        value = getattr(training, name, None)
        if isinstance(value, str) and value and not _is_url(value) and not Path(value).expanduser().is_absolute():
            candidate = base_dir / value
            if candidate.exists():
                update[name] = str(candidate.resolve())
    return training.model_copy(update=update) if update else training


def parse_datasets(entries: list[Any], origin: Path) -> tuple[list[DatasetConfig], list[str]]:
    """Validate dataset entries (disabled ones included); relative local paths resolved beside `origin`."""
    datasets: list[DatasetConfig] = []
    problems: list[str] = []
    warnings: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{origin} ({_entry_name(entry, index)})"
        if not isinstance(entry, dict):
            problems.append(f"{where}: a dataset entry is an object of options, not {type(entry).__name__}")
            continue
        outcome = validate(DatasetConfig, entry, {}, DATASET_COMPAT, where)
        problems.extend(outcome.problems)
        warnings.extend(outcome.warnings)
        if isinstance(outcome.model, DatasetConfig):
            datasets.append(_with_local_paths(outcome.model, origin.parent))
    _fail(problems, f"dataset file {origin}")
    if not datasets:
        raise ConfigError(f"{origin}: no dataset entries; add at least one image dataset")
    return datasets, warnings


def _dataset_source(training: TrainingConfig, raw: RawConfig) -> tuple[Path, list[Any]]:
    base_dir = raw.path.parent if raw.path else None
    if raw.datasets is not None:
        if training.data_backend_config:
            raise ConfigError(f"{raw.path}: both [[datasets]] tables and data_backend_config are given; keep one")
        assert raw.path is not None
        return raw.path, raw.datasets
    if training.data_backend_config:
        path = resolve_beside(training.data_backend_config, base_dir)
        return path, _read_dataset_file(path)
    if base_dir is not None and (base_dir / DEFAULT_DATASET_FILE).is_file():
        path = base_dir / DEFAULT_DATASET_FILE  # SimpleTuner's default dataset file
        return path, _read_dataset_file(path)
    raise ConfigError(f"no datasets for {_subject(raw)}: set data_backend_config to a dataset file "
                      "(multidatabackend.json), or add [[datasets]] tables to a TOML configuration")


def load_datasets(training: TrainingConfig, config_path: str | Path | None = None,
                  include_disabled: bool = False) -> list[DatasetConfig]:
    """The dataset entries of a loaded configuration: enabled ones, or all with `include_disabled`."""
    raw = read_config_file(config_path) if config_path is not None else RawConfig()
    path, entries = _dataset_source(training, raw)
    datasets, warnings = parse_datasets(entries, path)
    _warn(warnings)
    return datasets if include_disabled else [d for d in datasets if not d.disabled]


def load_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> Settings:
    """Training options and datasets, validated together (references between datasets included)."""
    raw = read_raw(path, overrides)
    training, warnings = _training(raw)
    datasets_path, entries = _dataset_source(training, raw)
    datasets, dataset_warnings = parse_datasets(entries, datasets_path)
    _fail(reference_problems(datasets), f"dataset file {datasets_path}")
    warnings = warnings + dataset_warnings
    _warn(warnings)
    return Settings(
        training=training,
        datasets=[d for d in datasets if not d.disabled],
        disabled_datasets=[d for d in datasets if d.disabled],
        config_path=raw.path.resolve() if raw.path else None,
        datasets_path=datasets_path.resolve(),
        warnings=warnings,
    )
