"""Every option, described from the schema: for `simpletuner options` and docs/OPTIONS.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from simpletuner.config import types
from simpletuner.config.compat import (
    ALIASES, DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED, FAMILY_SWITCHES, IGNORED, UNSUPPORTED,
)
from simpletuner.config.schema import DatasetConfig, ParquetOptions, TrainingConfig

DOCS_COMMAND = "python -m simpletuner.commands.options --write-docs"


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    required: bool
    default: Any
    choices: list[Any]
    help: str


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    model: type[BaseModel]
    prefix: str = ""


SECTIONS = [
    Section("Training options", "Keys of config.toml / config.json (with or without a leading `--`), "
            "or `--key value` on the command line.", TrainingConfig),
    Section("Dataset entries", "Keys of each entry of the dataset file (multidatabackend.json) or of each "
            "`[[datasets]]` table in a TOML configuration.", DatasetConfig),
    Section("Dataset parquet options", "Keys of a dataset entry's `parquet` table (captions and sizes from a "
            "parquet, jsonl or csv file).", ParquetOptions, "parquet."),
]


def options(model: type[BaseModel], prefix: str = "") -> list[OptionInfo]:
    """The fields of `model`, in declaration order."""
    rows = []
    for name, info in model.model_fields.items():
        rows.append(OptionInfo(
            name=prefix + name,
            type=types.type_name(info.annotation),
            required=info.is_required(),
            default=types.field_default(info),
            choices=types.choices(info.annotation),
            help=info.description or "",
        ))
    return rows


def show_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_text(option: OptionInfo) -> str:
    return "required" if option.required else show_value(option.default)


def _choices_text(option: OptionInfo) -> str:
    return ", ".join(str(c) for c in option.choices)


def render_text(filter_text: str = "") -> str:
    """Plain text for a terminal; `filter_text` keeps options whose name or help contains it."""
    lines: list[str] = []
    needle = filter_text.lower()
    for section in SECTIONS:
        rows = [o for o in options(section.model, section.prefix)
                if needle in o.name.lower() or needle in o.help.lower()]
        if not rows:
            continue
        lines += [f"{section.title}", "=" * len(section.title)]
        for option in rows:
            head = f"{option.name} ({option.type}) default: {_default_text(option)}"
            lines.append(head)
            if option.choices:
                lines.append(f"    accepted: {_choices_text(option)}")
            lines.append(f"    {option.help}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[OptionInfo]) -> list[str]:
    lines = ["| option | type | default | accepted | description |", "| --- | --- | --- | --- | --- |"]
    for option in rows:
        lines.append("| " + " | ".join(_cell(part) for part in (
            f"`{option.name}`", option.type, _default_text(option), _choices_text(option), option.help)) + " |")
    return lines


def _compat_lists() -> list[str]:
    lines = ["## SimpleTuner options", "",
             "Other spellings accepted: " + ", ".join(f"`{a}` = `{b}`" for a, b in {**ALIASES, **DATASET_ALIASES}.items())
             + ".", "",
             "Old switches translated: " + ", ".join(f"`{k}=true`" for k in FAMILY_SWITCHES)
             + " set `model_family`; `offset_noise=true` sets `noise_offset` to 0.1 unless given (without it "
             "SimpleTuner ignores `noise_offset`, and so do we, with a warning); `use_bitfit=true` sets "
             "`layer_freeze_strategy=bitfit`. config.env variables take SimpleTuner's names (MODEL_NAME, "
             "LEARNING_RATE, ...) or an option's name in capitals; TRAINER_EXTRA_ARGS holds more `--key=value`.", "",
             "Accepted and ignored, with a warning (they cannot change what is trained):", ""]
    for name, reason in sorted({**IGNORED, **{f"{k} (dataset)": v for k, v in DATASET_IGNORED.items()}}.items()):
        lines.append(f"- `{name}`: {reason}")
    lines += ["", "Not supported: an error, unless set to its \"off\" value (false, empty, or SimpleTuner's "
              "default), which is ignored with a warning:", ""]
    unsupported = {**UNSUPPORTED, **{f"{k} (dataset)": v for k, v in DATASET_UNSUPPORTED.items()}}
    for name, rule in sorted(unsupported.items()):
        lines.append(f"- `{name}`: {rule.reason}")
    return lines


def render_markdown() -> str:
    """docs/OPTIONS.md."""
    lines = ["# Options", "",
             f"Generated from `src/simpletuner/config/schema.py` by `{DOCS_COMMAND}`; do not edit by hand.", "",
             "Booleans may be written as true/false (any case), yes/no, on/off or 1/0. Configuration files: TOML, "
             "JSON, SimpleTuner's config.json (keys with or without `--`) and config.env; `--key value` on the "
             "command line overrides them. `simpletuner config check FILE` validates a configuration.", "",
             "Paths: `data_backend_config` and a local dataset's `instance_data_dir`, `parquet.path` and "
             "`caption_filter_list` are looked up beside the file that names them first, then in the working "
             "directory (SimpleTuner's habit). Model and file options (`pretrained_*`, `init_lora`, "
             "`lycoris_config`, ...) are used beside the configuration file when they exist there, otherwise as "
             "written: a Hub id such as `stabilityai/stable-diffusion-xl-base-1.0`, or a path from the working "
             "directory. Cache and output folders are relative to the working directory.", ""]
    for section in SECTIONS:
        lines += [f"## {section.title}", "", section.intro, ""]
        lines += _table(options(section.model, section.prefix))
        lines.append("")
    lines += _compat_lists()
    return "\n".join(lines).rstrip() + "\n"
