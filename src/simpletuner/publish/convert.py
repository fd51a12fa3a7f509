"""Converting a finished run: an output or checkpoint to a LoRA format, or to a merged pipeline
(the `export` command).

Everything is written in a temporary folder beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.errors import UserError
from simpletuner.publish.export import LORA_FORMATS, check_lora_format, read_family_lora, write_lora_files
from simpletuner.publish.metadata import merged_metadata

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.adapters import TrainedLora

MERGED = "merged"


# ---------------------------------------------------------------------------- merged pipelines
def write_merged_pipeline(family: ModelFamily, components: Components, lora: TrainedLora, folder: str | Path) -> Path:
    """Fuse `lora` into the loaded base components and save the pipeline to `folder` (which must not exist
    yet): written under a temporary name beside it, then renamed."""
    from simpletuner.train.adapters import merge_lora

    folder = Path(folder)
    for component, layers in lora.layers.items():
        merge_lora(components[component], layers, lora.configs[component])
    with staging(folder.parent) as temp:
        family.pipeline(components).save_pretrained(temp / folder.name, safe_serialization=True)
        header = merged_metadata(lora.metadata)
        for component in lora.layers:
            for file in sorted((temp / folder.name / component).glob("*.safetensors")):
                _add_metadata(file, header)
        os.replace(temp / folder.name, folder)
    return folder


def _add_metadata(file: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file with `metadata` added to its header."""
    from safetensors import safe_open

    from simpletuner.publish.lora_files import save_file_atomic

    with safe_open(str(file), framework="pt") as handle:
        header = {**(handle.metadata() or {}), **metadata}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file_atomic(tensors, file, header)


@contextmanager
def staging(parent: Path) -> Iterator[Path]:
    """A temporary folder inside `parent` (the same file system, so renames out of it are atomic),
    removed afterwards with whatever is left in it."""
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=parent))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------- the base model's parts
def with_base_parts(family: ModelFamily, cfg: TrainingConfig, lora: TrainedLora, needs: frozenset[str]) -> TrainedLora:
    """`lora` with what a format needs of the base model (export.BASE_NEEDS) that a LoRA read from a file
    lacks: "model_configs" from the base model's <component>/config.json, "base_weights" (DoRA) from the
    base model loaded as the run loaded it."""
    from dataclasses import replace

    from simpletuner.models.base import read_model_json

    if not needs:
        return lora
    source = cfg.pretrained_model_name_or_path
    configs = {component: read_model_json(source, f"{component}/config.json", cfg.revision)
               for component in lora.layers if component not in lora.model_configs} if "model_configs" in needs else {}
    bases: dict = {}
    if "base_weights" in needs:
        from simpletuner.models.base import DTypePolicy

        components = family.load(cfg, DTypePolicy.for_training(cfg))
        bases = {component: {module: components[component].get_submodule(module).weight.detach()
                             for module in lora.modules(component)}
                 for component, config in lora.configs.items() if config.get("use_dora")}
    return replace(lora, model_configs={**configs, **lora.model_configs}, base_weights={**bases, **lora.base_weights})


# ---------------------------------------------------------------------------- the export command
@dataclass(frozen=True)
class ExportSource:
    """A finished training output or one of its checkpoints, as the export command reads it."""

    folder: Path  # where the run's LoRA files lie
    kind: str  # "output" | "checkpoint"
    config: TrainingConfig  # the run's configuration
    step: int


def find_export_source(path: str | Path) -> ExportSource:
    """The output or checkpoint at `path`, or a UserError saying what it is not."""
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.train.checkpoint import is_complete, list_checkpoints, read_meta

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{path}: no such folder; give a training output_dir or one of its checkpoints/step-N")
    if is_complete(folder):
        kind, checkpoint = "checkpoint", folder
    elif list_checkpoints(folder):
        kind, checkpoint = "output", list_checkpoints(folder)[-1]
    else:
        raise UserError(f"{path}: neither a training output (no complete checkpoints/step-N inside) nor a "
                        "checkpoint (a step-N folder with meta.json)")
    try:
        config = TrainingConfig.model_validate(json.loads((checkpoint / "config.json").read_text()))
    except (OSError, ValueError) as error:
        raise UserError(f"{checkpoint}: cannot read the run's configuration config.json: {error}") from error
    if "lora" not in config.model_type or config.lora_type != "standard":
        what = ("a full fine-tune: its model is the pipeline folder output_dir/pipeline"
                if "lora" not in config.model_type else "a LyCORIS run: its file loads through lycoris")
        raise UserError(f"{path} is {what}; export converts runs of standard LoRA (lora_type=standard)")
    if "diffusers" not in config.lora_format:
        raise UserError(f"{path}: the run wrote lora_format {', '.join(config.lora_format)} only; export converts "
                        "from the diffusers file (pytorch_lora_weights.safetensors, PixArt and Hunyuan-DiT: peft's "
                        "folder), which it did not write")
    return ExportSource(folder, kind, config, int(read_meta(checkpoint)["step"]))


def export_formats() -> list[str]:
    """Every format the export command knows: the LoRA formats, and the merged pipeline."""
    return [*LORA_FORMATS, MERGED]


def export(source: ExportSource, fmt: str, destination: str | Path) -> list[Path]:
    """Write `source`'s LoRA in format `fmt` (a LoRA format, or "merged") into `destination`."""
    from simpletuner.models.base import read_model_index
    from simpletuner.models.registry import get_family

    cfg = source.config
    family = get_family(cfg.model_family)
    destination = Path(destination)
    if fmt not in export_formats():
        raise UserError(f"export format {fmt!r} does not exist; accepted: {', '.join(export_formats())}")
    if fmt != MERGED:
        chosen = check_lora_format(fmt, family)
        pipeline_class = read_model_index(cfg.pretrained_model_name_or_path, cfg.revision)["_class_name"]
        lora = read_family_lora(family, source.folder, pipeline_class)
        lora = with_base_parts(family, cfg, lora, chosen.needs(family, lora))
        with staging(destination) as temp:  # every file is complete before it takes its name
            written = write_lora_files(family, lora, temp, [fmt])
            for entry in list(temp.iterdir()):
                os.replace(entry, destination / entry.name)
            return [destination / path.relative_to(temp) for path in written]
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination}: the folder exists and is not empty; a merged pipeline needs a new folder")
    from simpletuner.models.base import DTypePolicy

    components = family.load(cfg, DTypePolicy.for_training(cfg))
    lora = read_family_lora(family, source.folder, components.pipeline_class)
    if destination.exists():
        destination.rmdir()
    return [write_merged_pipeline(family, components, lora, destination)]
