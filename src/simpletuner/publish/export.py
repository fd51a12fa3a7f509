"""The final model and its other forms: LoRA files, a LyCORIS file, a full or merged pipeline folder.

- LoRA: every LoRA file is written by `write_lora_files` from one `TrainedLora` (the trained weights
  in diffusers' module names, the per-module alpha and the metadata), through the writers of
  `LORA_FORMATS`. "diffusers" is the family's own file: output_dir/pytorch_lora_weights.safetensors,
  which the family's pipeline loads whole with
  `load_lora_weights(output_dir, weight_name="pytorch_lora_weights.safetensors")` (PixArt: peft's
  adapter folder, as its pipeline has no LoRA loader). "comfyui" is output_dir/<run name>.safetensors
  in kohya names with alpha tensors, for ComfyUI, A1111 and Forge (publish.ui_file, docs/UI_LORA.md).
  The option lora_format names the formats of the final export and of every checkpoint.
- LyCORIS: output_dir/pytorch_lora_weights.safetensors through lycoris (load it with lycoris).
- full: output_dir/pipeline/, a folder `DiffusionPipeline.from_pretrained` loads.
- merged: the base pipeline with the LoRA fused into its weights (publish.convert, the `export` command).
- ControlNet (controlnet=true): output_dir/controlnet/, the ControlNet's `save_pretrained` folder that
  `ControlNetModel.from_pretrained` loads for the family's ControlNet pipeline; under a LoRA that folder
  holds the ControlNet with the LoRA fused in, output_dir/pytorch_lora_weights.safetensors holds the
  LoRA itself (`controlnet.<module>.lora_A.weight`, ...), and output_dir/controlnet_base/ the ControlNet the
  LoRA trained on (a ControlNet made from the denoiser has freshly initialised control-image layers), onto
  which `load_lora_adapter(file, prefix="controlnet")` loads it. Checkpoints keep the same LoRA file. This
  file is written by `write_controlnet_lora`, not through LORA_FORMATS: lora_format does not apply to it (the
  UI formats are files of a denoiser's LoRA; a ControlNet's LoRA has no UI format).
With EMA, the averaged weights are what is exported (and what checkpoints' LoRA files hold). The final
export is written into output_dir/.tmp-export/ first and moved into place when complete, so a failed
export (a full disk) never leaves a half-written model under the final name (the ControlNet folders too).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.errors import UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.adapters import Trained, TrainedLora
    from simpletuner.train.ema import EMA
    from simpletuner.train.setup import Run

logger = get_logger(__name__)
PIPELINE_FOLDER = "pipeline"
STAGING_FOLDER = ".tmp-export"

LoraWriter = Callable[["ModelFamily", "TrainedLora", Path], Path]
BASE_NEEDS = ("model_configs", "base_weights")  # what a format may need of the base model (TrainedLora fields)


@dataclass(frozen=True)
class LoraFormat:
    """One LoRA file format: how to write it and which families can have it."""

    name: str
    description: str
    write: LoraWriter  # (family, lora, directory) -> the file written
    supports: Callable[[ModelFamily], bool] = lambda family: True
    # which of BASE_NEEDS the writer needs that this LoRA lacks (a LoRA read back from a file has neither)
    needs: Callable[[ModelFamily, TrainedLora], frozenset[str]] = lambda family, lora: frozenset()


def _write_ui_lora(family: ModelFamily, lora: TrainedLora, directory: Path) -> Path:
    from simpletuner.publish.ui_file import write_ui_lora

    return write_ui_lora(family, lora, directory)


def _ui_supports(family: ModelFamily) -> bool:
    from simpletuner.publish.ui_file import ui_supports

    return ui_supports(family)


def _ui_needs(family: ModelFamily, lora: TrainedLora) -> frozenset[str]:
    from simpletuner.publish.ui_file import ui_needs

    return ui_needs(family, lora)


def _write_family_lora(family: ModelFamily, lora: TrainedLora, directory: Path) -> Path:
    from simpletuner.publish.lora_files import write_diffusers_lora, write_peft_lora

    return write_diffusers_lora(directory, lora) if family.lora_loader else write_peft_lora(directory, lora)


def read_family_lora(family: ModelFamily, folder: Path, pipeline_class: str) -> TrainedLora:
    """The LoRA that the "diffusers" format wrote into `folder` (an output or checkpoint)."""
    from simpletuner.publish.lora_files import read_diffusers_lora, read_peft_lora
    from simpletuner.train.adapters import LORA_WEIGHTS

    if not family.lora_loader:
        return read_peft_lora(folder, pipeline_class, family.denoiser_name())
    if not (folder / LORA_WEIGHTS).is_file():
        raise UserError(f"{folder}: no {LORA_WEIGHTS}; it is not the output or a checkpoint of a {family.name} LoRA "
                        "run, or a checkpoint saved before checkpoints kept the LoRA file")
    return read_diffusers_lora(folder / LORA_WEIGHTS, pipeline_class)


# name -> format; a new format is one entry here (its writer puts lora.metadata, publish.metadata's
# entries, in the file's header)
LORA_FORMATS: dict[str, LoraFormat] = {
    "diffusers": LoraFormat("diffusers", "pytorch_lora_weights.safetensors for the pipeline's load_lora_weights "
                            "(PixArt: peft's adapter folder)", _write_family_lora),
    "comfyui": LoraFormat("comfyui", "<run name>.safetensors in kohya names with alpha tensors, for ComfyUI, "
                          "A1111 and Forge", _write_ui_lora, _ui_supports, _ui_needs),
}


def check_lora_format(name: str, family: ModelFamily, formats: Mapping[str, LoraFormat] = LORA_FORMATS,
                      *, refuse: bool = True) -> LoraFormat | None:
    """The format named `name`, or a UserError if it does not exist or this family cannot have it (with
    refuse=False: None for a format the family cannot have)."""
    if name not in formats:
        raise UserError(f"LoRA format {name!r} does not exist; accepted: {', '.join(formats)}")
    chosen = formats[name]
    if not chosen.supports(family):
        if not refuse:
            return None
        can = [n for n, f in formats.items() if f.supports(family)]
        raise UserError(f"LoRA format {name!r} is not available for model_family {family.name!r}; "
                        f"it can have: {', '.join(can)}")
    return chosen


def available_lora_formats(family: ModelFamily, formats: Sequence[str],
                           registry: Mapping[str, LoraFormat] = LORA_FORMATS) -> list[str]:
    """The formats of `formats` (the lora_format option) that `family` can have; the others are left out
    with a note in the log (DeepFloyd has no UI format). A UserError when none is left."""
    kept = [name for name in formats if check_lora_format(name, family, registry, refuse=False)]
    for name in formats:
        if name not in kept:
            logger.info("lora_format %s: not available for model_family %s; not written", name, family.name)
    if not kept:
        check_lora_format(formats[0], family, registry)  # raises, naming the formats it can have
    return kept


def write_lora_files(family: ModelFamily, lora: TrainedLora, directory: str | Path, formats: Sequence[str],
                     registry: Mapping[str, LoraFormat] = LORA_FORMATS) -> list[Path]:
    """Write `lora` into `directory` in each of `formats`; returns the files written."""
    chosen = [check_lora_format(name, family, registry) for name in formats]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [fmt.write(family, lora, directory) for fmt in chosen]


# ---------------------------------------------------------------------------- from a training run
def run_metadata(run: Run, steps: int) -> dict[str, str]:
    """The metadata of this run's files at `steps` (publish.metadata)."""
    from simpletuner.publish.metadata import file_metadata, summarize

    sizes = {name: len(data.latent_items) for name, data in run.data.datasets.items()}
    return file_metadata(summarize(run.cfg, run.family, run.components, steps, datasets=run.settings.datasets,
                                   dataset_sizes=sizes))


def trained_lora(family: ModelFamily, components: Components, trained: Trained,
                 metadata: Mapping[str, str]) -> TrainedLora:
    """The run's LoRA (the denoiser's adapter, and the text encoders' where they train) as the input of every
    LoRA writer."""
    from simpletuner.train.adapters import TrainedLora
    from simpletuner.train.fusion import fused_part_rows, split_fused_lora

    lora = TrainedLora.from_models(components.pipeline_class,
                                   {family.denoiser_name(): trained.model, **trained.text_encoders}, metadata)
    rows = fused_part_rows(trained.model)  # fuse_qkv_projections: written as the separate projections' LoRAs
    return split_fused_lora(lora, family.denoiser_name(), rows) if rows else lora


def export_model(family: ModelFamily, components: Components, trained: Trained, cfg: Any,
                 ema: EMA | None = None, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write the final weights into cfg.output_dir; returns the files or folders written."""
    output_dir = Path(cfg.output_dir)
    staging = output_dir / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that failed
    staging.mkdir(parents=True)
    if ema is not None:
        ema.copy_to()
    if getattr(cfg, "controlnet", False):
        written = export_controlnet(trained, staging, metadata or {})
    elif trained.kind == "lora":
        written = write_lora_files(family, trained_lora(family, components, trained, metadata or {}), staging,
                                   available_lora_formats(family, cfg.lora_format))
    elif trained.kind == "lycoris":
        from simpletuner.train.adapters import load_lycoris_config, save_lycoris_weights

        written = [save_lycoris_weights(staging, trained.module, load_lycoris_config(cfg.lycoris_config),
                                        metadata)]
        from simpletuner.train.fusion import fused_part_rows, split_fused_lycoris_file

        rows = fused_part_rows(trained.model)  # fuse_qkv_projections: written as the separate projections'
        if rows:
            split_fused_lycoris_file(written[0], rows)
    else:
        if cfg.fuse_qkv_projections:  # saved with diffusers' separate projections
            from simpletuner.train.fusion import unfuse_qkv

            unfuse_qkv(family.denoiser(components))
        written = [staging / PIPELINE_FOLDER]
        family.pipeline(components).save_pretrained(written[0], safe_serialization=True)
    _move_into(staging, output_dir)  # every file the format wrote (peft writes a config beside the weights)
    final = [output_dir / Path(path).relative_to(staging) for path in written]
    logger.info("exported %s", ", ".join(str(path) for path in final))
    return final


def checkpoint_lora_writer(run: Run, steps: int) -> Callable[[Path], None] | None:
    """For a LoRA run, what writes the run's LoRA files into a checkpoint folder (with EMA: the averaged
    weights, as the final export); None for other runs."""
    if run.trained.kind != "lora":
        return None
    formats = available_lora_formats(run.family, run.cfg.lora_format)

    def write(folder: Path) -> None:
        with run.ema.applied() if run.ema is not None else nullcontext():
            if run.cfg.controlnet:
                write_controlnet_lora(run.trained.model, folder, run_metadata(run, steps))
                return
            lora = trained_lora(run.family, run.components, run.trained, run_metadata(run, steps))
        write_lora_files(run.family, lora, folder, formats)

    return write


# ---------------------------------------------------------------------------- ControlNet
CONTROLNET_FOLDER = "controlnet"
CONTROLNET_BASE_FOLDER = "controlnet_base"  # under a LoRA: the ControlNet the LoRA applies to


def export_controlnet(trained: Trained, output_dir: Path, metadata: Mapping[str, str]) -> list[Path]:
    """output_dir/controlnet/ (the ControlNet, any LoRA fused in) and, under a LoRA, the LoRA file."""
    if trained.kind == "lycoris":
        raise UserError("controlnet=true with lora_type='lycoris' is not exported: train the ControlNet in full "
                        "or with lora_type='standard'")
    written = []
    model = trained.model
    if trained.kind == "lora":
        written.append(write_controlnet_lora(model, output_dir, metadata))
        plain_copy(model, merge=False).save_pretrained(output_dir / CONTROLNET_BASE_FOLDER, safe_serialization=True)
        written.append(output_dir / CONTROLNET_BASE_FOLDER)
        model = plain_copy(model, merge=True)
    model.save_pretrained(output_dir / CONTROLNET_FOLDER, safe_serialization=True)
    return [output_dir / CONTROLNET_FOLDER, *written]


def write_controlnet_lora(model: Any, directory: Path, metadata: Mapping[str, str]) -> Path:
    """The ControlNet's LoRA as pytorch_lora_weights.safetensors, peft's names under `controlnet.`, with the
    adapter configuration in diffusers' `lora_adapter_metadata` header entry (what load_lora_adapter reads)."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import get_peft_model_state_dict

    from simpletuner.publish.lora_files import save_file_atomic
    from simpletuner.train.adapters import LORA_WEIGHTS, _jsonable_config

    weights = {f"{CONTROLNET_FOLDER}.{key}": value.detach().to("cpu").contiguous()
               for key, value in get_peft_model_state_dict(model).items()}
    config = _jsonable_config(model.peft_config["default"].to_dict())
    header = {**metadata, "format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)}
    return save_file_atomic(weights, Path(directory) / LORA_WEIGHTS, header)


def plain_copy(model: Any, merge: bool) -> Any:
    """A copy of a peft-adapted model without adapter layers: the adapter fused into the weights (`merge`), or
    left out (the weights it trained on)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, module.get_base_layer())
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    plain._hf_peft_config_loaded = False
    return plain


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move each complete entry of `staging` into `output_dir`, replacing an earlier export's; remove `staging`."""
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)  # the pipeline folder of an earlier export
        entry.replace(target)
    staging.rmdir()
