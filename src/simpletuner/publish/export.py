"""The final model and its other forms: LoRA files, a LyCORIS file, a full or merged pipeline folder.

- LoRA: every LoRA file is written by `write_lora_files` from one `TrainedLora` (the trained weights
  in diffusers' module names, the per-module alpha and the metadata), through the writers of
  `LORA_FORMATS`. "diffusers" is the family's own file: output_dir/pytorch_lora_weights.safetensors,
  which the family's pipeline loads whole with
  `load_lora_weights(output_dir, weight_name="pytorch_lora_weights.safetensors")` (PixArt: peft's
  adapter folder, as its pipeline has no LoRA loader). Every checkpoint keeps the same file.
- LyCORIS: output_dir/pytorch_lora_weights.safetensors through lycoris (load it with lycoris).
- full: output_dir/pipeline/, a folder `DiffusionPipeline.from_pretrained` loads.
- merged: the base pipeline with the LoRA fused into its weights (publish.convert, the `export` command).
- ControlNet (controlnet=true): output_dir/controlnet/, the ControlNet's `save_pretrained` folder that
  `ControlNetModel.from_pretrained` loads for the family's ControlNet pipeline; under a LoRA that folder
  holds the ControlNet with the LoRA fused in, output_dir/pytorch_lora_weights.safetensors holds the
  LoRA itself (`controlnet.<module>.lora_A.weight`, ...), and output_dir/controlnet_base/ the ControlNet the
  LoRA trained on (a ControlNet made from the denoiser has freshly initialised control-image layers), onto
  which `load_lora_adapter(file, prefix="controlnet")` loads it. Checkpoints keep the same LoRA file.
With EMA, the averaged weights are what is exported (and what checkpoints' LoRA files hold).
"""

from __future__ import annotations

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

LoraWriter = Callable[["ModelFamily", "TrainedLora", Path], Path]


@dataclass(frozen=True)
class LoraFormat:
    """One LoRA file format: how to write it and which families can have it."""

    name: str
    description: str
    write: LoraWriter  # (family, lora, directory) -> the file written
    supports: Callable[[ModelFamily], bool] = lambda family: True


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
}
DEFAULT_LORA_FORMATS: tuple[str, ...] = ("diffusers",)


def check_lora_format(name: str, family: ModelFamily, formats: Mapping[str, LoraFormat] = LORA_FORMATS) -> LoraFormat:
    """The format named `name`, or a UserError if it does not exist or this family cannot have it."""
    if name not in formats:
        raise UserError(f"LoRA format {name!r} does not exist; accepted: {', '.join(formats)}")
    chosen = formats[name]
    if not chosen.supports(family):
        can = [n for n, f in formats.items() if f.supports(family)]
        raise UserError(f"LoRA format {name!r} is not available for model_family {family.name!r}; "
                        f"it can have: {', '.join(can)}")
    return chosen


def write_lora_files(family: ModelFamily, lora: TrainedLora, directory: str | Path,
                     formats: Sequence[str] = DEFAULT_LORA_FORMATS,
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
    """The run's LoRA (the denoiser's adapter) as the input of every LoRA writer."""
    from simpletuner.train.adapters import TrainedLora

    return TrainedLora.from_models(components.pipeline_class, {family.denoiser_name(): trained.model}, metadata)


def export_model(family: ModelFamily, components: Components, trained: Trained, cfg: Any,
                 ema: EMA | None = None, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write the final weights into cfg.output_dir; returns the files or folders written."""
    output_dir = Path(cfg.output_dir)
    if ema is not None:
        ema.copy_to()
    if getattr(cfg, "controlnet", False):
        written = export_controlnet(trained, output_dir, metadata or {})
    elif trained.kind == "lora":
        written = write_lora_files(family, trained_lora(family, components, trained, metadata or {}), output_dir)
    elif trained.kind == "lycoris":
        from simpletuner.train.adapters import load_lycoris_config, save_lycoris_weights

        written = [save_lycoris_weights(output_dir, trained.module, load_lycoris_config(cfg.lycoris_config),
                                        metadata)]
    else:
        if cfg.fuse_qkv_projections:  # saved with diffusers' separate projections
            from simpletuner.train.fusion import unfuse_qkv

            unfuse_qkv(family.denoiser(components))
        written = [output_dir / PIPELINE_FOLDER]
        family.pipeline(components).save_pretrained(written[0], safe_serialization=True)
    logger.info("exported %s", ", ".join(str(path) for path in written))
    return written


def checkpoint_lora_writer(run: Run, steps: int) -> Callable[[Path], None] | None:
    """For a LoRA run, what writes the run's LoRA files into a checkpoint folder (with EMA: the averaged
    weights, as the final export); None for other runs."""
    if run.trained.kind != "lora":
        return None

    def write(folder: Path) -> None:
        with run.ema.applied() if run.ema is not None else nullcontext():
            if run.cfg.controlnet:
                write_controlnet_lora(run.trained.model, folder, run_metadata(run, steps))
                return
            lora = trained_lora(run.family, run.components, run.trained, run_metadata(run, steps))
        write_lora_files(run.family, lora, folder)

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
