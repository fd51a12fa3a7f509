"""Load a training configuration and its datasets from files and command-line overrides.

    settings = load_settings("config/config.json", ["--learning_rate", "1e-4"])
    settings.training.learning_rate, settings.datasets

Precedence: command-line overrides > the configuration file > the schema's defaults. Every problem of
the options, the dataset file and the references between datasets is reported together (`read_settings`).
Datasets come from the file named by `data_backend_config` (SimpleTuner's
multidatabackend.json; a relative path is looked up beside the configuration file first,
then in the working directory, as SimpleTuner does), or from `[[datasets]]` tables in a
TOML configuration. A local dataset's relative paths (instance_data_dir, parquet.path, a
caption_filter_list file) are resolved the same way against the dataset file's folder, so
loaded datasets carry absolute local paths; `{model_family}`, `{output_dir}` and `{id}` in a dataset's cache
paths are expanded. A path starting with `config/examples/` is first looked up in SimpleTuner's examples
folder (see `resolve_beside`). Training options naming files or model folders
(TRAINING_PATHS) become absolute when they exist beside the configuration file; otherwise
they stay as written (a Hub id, or a path from the working directory). Cache and output
folders stay as written: relative to the working directory, as in SimpleTuner.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import compress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from simpletuner.config.arguments import parse_arguments
from simpletuner.config.compat import (
    ALIASES, DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED, IGNORED, LEGACY_SWITCHES, UNSUPPORTED,
    translate_legacy,
)
from simpletuner.config.files import RawConfig, parse_json, read_config_file
from simpletuner.config.references import reference_problems
from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.config.validate import SUGGESTED_UNKNOWN, Compat, recognised_names, validate
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
    """The options of `path` with `overrides` applied on top, old SimpleTuner switches translated. A large JSON
    file keeps only the options read later and the first unknown ones (the rest are counted: RawConfig.left_out)."""
    given = parse_arguments(list(overrides))
    recognised = recognised_names(TrainingConfig, TRAINING_COMPAT) | LEGACY_SWITCHES | given.keys()
    raw = read_config_file(path, recognised, SUGGESTED_UNKNOWN + 1) if path is not None else RawConfig()
    raw.update(given, "command line")
    raw.warnings.extend(translate_legacy(raw.values, raw.sources))
    return raw


def _subject(raw: RawConfig) -> str:
    return f"configuration {raw.path}" if raw.path else "configuration (command line)"


def _training(raw: RawConfig) -> tuple[TrainingConfig, list[str]]:
    origin = str(raw.path) if raw.path else "command line"
    outcome = validate(TrainingConfig, raw.values, raw.sources, TRAINING_COMPAT, origin, raw.left_out)
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


EXAMPLES_PREFIX = "config/examples/"


def _examples_candidates(value: str, base_dir: Path | None) -> list[Path]:
    """SimpleTuner reads `config/examples/X` as X in its packaged examples folder, the folder holding each
    example's own folder: here, the configuration file's folder and the one above it."""
    if base_dir is None or not value.startswith(EXAMPLES_PREFIX):
        return []
    rest = value[len(EXAMPLES_PREFIX):]
    return [base_dir / rest, base_dir.parent / rest]


def resolve_beside(value: str | Path, base_dir: Path | None) -> Path:
    """A relative path: for `config/examples/X`, X in SimpleTuner's examples folder (see `_examples_candidates`)
    if it exists there; else beside `base_dir` if it exists there, else in the working directory if it exists
    there, else (to be reported as missing) beside `base_dir`."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    beside = base_dir / path if base_dir is not None else Path.cwd() / path
    for candidate in _examples_candidates(str(value), base_dir) + [beside, Path.cwd() / path]:
        if candidate.exists():
            return candidate.resolve()
    return beside.absolute()


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
            found = [c for c in _examples_candidates(value, base_dir) + [base_dir / value] if c.exists()]
            if found:
                update[name] = str(found[0].resolve())
    return training.model_copy(update=update) if update else training


# {name} in a dataset's cache paths, as SimpleTuner's example dataset files use them.
PATH_VARIABLES = ("model_family", "output_dir", "id")
CACHE_PATHS = ("cache_dir", "cache_dir_vae")
_VARIABLE = re.compile(r"\{([^{}]*)\}")


def _with_path_variables(dataset: DatasetConfig, variables: dict[str, str], where: str,
                         problems: list[str]) -> DatasetConfig:
    """`{model_family}`, `{output_dir}` and `{id}` in cache_dir / cache_dir_vae replaced by their values."""
    values = {**variables, "id": dataset.id}
    update = {}
    for name in CACHE_PATHS:
        value = getattr(dataset, name)
        if not isinstance(value, str) or "{" not in value:
            continue
        unknown = [v for v in _VARIABLE.findall(value) if v not in values]
        if unknown:
            problems.append(f"{where}: {name} {value!r} names {{{unknown[0]}}}; the variables are "
                            f"{', '.join('{' + v + '}' for v in PATH_VARIABLES)}")
            continue
        update[name] = _VARIABLE.sub(lambda m: values[m.group(1)], value)
    return dataset.model_copy(update=update) if update else dataset


def _parse_entries(entries: list[Any], origin: Path, variables: dict[str, str]
                   ) -> tuple[list[DatasetConfig], list[str], list[str]]:
    """(datasets, problems, warnings): every entry checked, relative local paths resolved beside `origin`."""
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
            dataset = _with_path_variables(outcome.model, variables, where, problems)
            datasets.append(_with_local_paths(dataset, origin.parent))
    if not entries:
        problems.append(f"{origin}: no dataset entries; add at least one image dataset")
    return datasets, problems, warnings


def _variables(training: TrainingConfig | None, raw: RawConfig) -> dict[str, str]:
    if training is not None:
        return {"model_family": training.model_family, "output_dir": training.output_dir}
    family, output = raw.values.get("model_family"), raw.values.get("output_dir")
    return {"model_family": family if isinstance(family, str) else "",
            "output_dir": output if isinstance(output, str) else TrainingConfig.model_fields["output_dir"].default}


def parse_datasets(entries: list[Any], origin: Path, variables: dict[str, str] | None = None
                   ) -> tuple[list[DatasetConfig], list[str]]:
    """Validate dataset entries (disabled ones included); relative local paths resolved beside `origin`,
    path variables ({model_family}, {output_dir}, {id}) expanded from `variables`."""
    datasets, problems, warnings = _parse_entries(entries, origin, variables or {})
    _fail(problems, f"dataset file {origin}")
    return datasets, warnings


def _dataset_source(data_backend_config: Any, raw: RawConfig) -> tuple[Path, list[Any]]:
    base_dir = raw.path.parent if raw.path else None
    if raw.datasets is not None:
        if data_backend_config:
            raise ConfigError(f"{raw.path}: both [[datasets]] tables and data_backend_config are given; keep one")
        assert raw.path is not None
        return raw.path, raw.datasets
    if isinstance(data_backend_config, str) and data_backend_config:
        path = resolve_beside(data_backend_config, base_dir)
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
    path, entries = _dataset_source(training.data_backend_config, raw)
    datasets, warnings = parse_datasets(entries, path, _variables(training, raw))
    _warn(warnings)
    return datasets if include_disabled else [d for d in datasets if not d.disabled]


@dataclass
class Loaded:
    """Everything one reading of a configuration found: what validated, and every problem (training options,
    dataset file and references together)."""

    raw: RawConfig
    training: TrainingConfig | None
    datasets: list[DatasetConfig]  # the entries that validated, disabled ones included
    datasets_path: Path | None
    problems: list[str]
    warnings: list[str]
    subject: str  # what the problems are in, for the error's first line

    def partial_training(self) -> TrainingConfig:
        """The validated training options, or, when some are bad, the options as written (not validated;
        defaults for the rest): enough for checks that do not need every value to be right."""
        if self.training is not None:
            return self.training
        fields, values = TrainingConfig.model_fields, {}
        names = fields.keys() | ALIASES.keys()
        given = self.raw.values  # only options and their other spellings (filtered in C: there may be millions)
        for key, value in compress(given.items(), map(names.__contains__, given)):
            key = ALIASES.get(key, key)
            if key in fields:
                try:  # each value as its field reads it ("false" -> False); a bad one keeps the default
                    values[key] = TypeAdapter(fields[key].annotation).validate_python(value)
                except ValidationError:
                    pass
        return TrainingConfig.model_construct(**values)

    def settings(self) -> Settings:
        """The settings; raises ConfigError listing every problem when there are any."""
        _fail(self.problems, self.subject)
        assert self.training is not None and self.datasets_path is not None
        return Settings(
            training=self.training,
            datasets=[d for d in self.datasets if not d.disabled],
            disabled_datasets=[d for d in self.datasets if d.disabled],
            config_path=self.raw.path.resolve() if self.raw.path else None,
            datasets_path=self.datasets_path.resolve(),
            warnings=self.warnings,
        )


def read_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> Loaded:
    """Read and check a configuration and its datasets, collecting every problem instead of stopping at the
    first stage that has one."""
    raw = read_raw(path, overrides)
    origin = str(raw.path) if raw.path else "command line"
    outcome = validate(TrainingConfig, raw.values, raw.sources, TRAINING_COMPAT, origin, raw.left_out)
    training = outcome.model if isinstance(outcome.model, TrainingConfig) else None
    if training is not None:
        training = _with_config_relative_paths(training, raw.path.parent if raw.path else None)
    problems, warnings = list(outcome.problems), raw.warnings + outcome.warnings
    subjects = [_subject(raw)] if problems else []
    datasets: list[DatasetConfig] = []
    datasets_path = None
    try:
        datasets_path, entries = _dataset_source(raw.values.get("data_backend_config"), raw)
    except ConfigError as error:
        problems.append(str(error))
    else:
        datasets, dataset_problems, dataset_warnings = _parse_entries(entries, datasets_path,
                                                                      _variables(training, raw))
        if not dataset_problems:
            dataset_problems = reference_problems(datasets)
        problems += dataset_problems
        warnings += dataset_warnings
        if dataset_problems:
            subjects.append(f"dataset file {datasets_path}")
    subject = " and ".join(subjects) or _subject(raw)
    return Loaded(raw, training, datasets, datasets_path, problems, warnings, subject)


def load_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> Settings:
    """Training options and datasets, validated together (references between datasets included)."""
    loaded = read_settings(path, overrides)
    settings = loaded.settings()
    _warn(loaded.warnings)
    return settings
