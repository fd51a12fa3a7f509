"""Conditioning generators: control images made from a dataset's own images (`conditioning: [{type: canny}]`).

`with_generated_conditioning` turns an image dataset's generator into a conditioning dataset of its own
(id `<id>_conditioning_<type>`, paired through `conditioning_data`) whose folder lies under
`<cache_dir>/conditioning/<id>/<type>-<settings>/`, never in the source folder. `generate` writes one PNG
per source image there, at the source's relative path, each under a temporary name then renamed; an image
already generated (newer than its source) is kept, and a source that cannot be read is reported and left
out (its image then has no partner: a counted skip). Canny edges come from OpenCV (the `controlnet` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.atomic import written_atomically
from simpletuner.errors import ConfigError, UserError

if TYPE_CHECKING:
    import numpy as np

    from simpletuner.config.load import Settings
    from simpletuner.config.schema import ConditioningGenerator, DatasetConfig


@dataclass
class Generated:
    """What one generator run did."""

    folder: Path
    written: int = 0
    kept: int = 0
    failed: list[str] = field(default_factory=list)  # "path: reason"

    def report(self, dataset_id: str) -> str:
        line = f"conditioning {dataset_id!r}: {self.written} generated, {self.kept} kept, in {self.folder}"
        if self.failed:
            line += f"; {len(self.failed)} source(s) unreadable, e.g. {'; '.join(self.failed[:3])}"
        return line


def generated_id(dataset_id: str, generator: ConditioningGenerator) -> str:
    return f"{dataset_id}_conditioning_{generator.type}"


def generated_folder(cache_dir: str, dataset_id: str, generator: ConditioningGenerator) -> Path:
    """Where a generator's images go: every setting that shapes them is in the folder's name."""
    return Path(cache_dir) / "conditioning" / dataset_id / \
        f"{generator.type}-{generator.low_threshold}-{generator.high_threshold}"


def with_generated_conditioning(settings: Settings) -> Settings:
    """`settings` whose datasets with a conditioning generator each have a generated conditioning dataset."""
    datasets: list[DatasetConfig] = []
    for dataset in settings.datasets:
        if not dataset.conditioning or dataset.disabled:
            datasets.append(dataset)
            continue
        generator = _check(dataset, settings)
        partner_id = generated_id(dataset.id, generator)
        folder = generated_folder(settings.training.cache_dir, dataset.id, generator)
        datasets.append(dataset.model_copy(update={"conditioning_data": partner_id, "conditioning": None}))
        datasets.append(type(dataset)(id=partner_id, dataset_type="conditioning", conditioning_type="controlnet",
                                      instance_data_dir=str(folder), resolution=dataset.resolution,
                                      resolution_type=dataset.resolution_type))
    return replace(settings, datasets=datasets)


def _check(dataset: DatasetConfig, settings: Settings) -> ConditioningGenerator:
    if not settings.training.controlnet:
        raise ConfigError(f"dataset {dataset.id!r}: conditioning generators make ControlNet inputs; set "
                          "controlnet=true or remove conditioning")
    if len(dataset.conditioning) != 1:
        raise ConfigError(f"dataset {dataset.id!r}: conditioning lists {len(dataset.conditioning)} generators; a "
                          "ControlNet trains on one")
    if dataset.conditioning_data:
        raise ConfigError(f"dataset {dataset.id!r}: both conditioning (generated) and conditioning_data="
                          f"{dataset.conditioning_data!r}; keep one")
    return dataset.conditioning[0]


def generate_all(settings: Settings, original: Settings) -> list[str]:
    """Generate the control images of every generator in `original`'s datasets; one report line each."""
    lines = []
    for dataset in original.datasets:
        if dataset.conditioning and not dataset.disabled:
            generator = dataset.conditioning[0]
            result = generate(Path(dataset.instance_data_dir),
                              generated_folder(settings.training.cache_dir, dataset.id, generator), generator)
            lines.append(result.report(generated_id(dataset.id, generator)))
    return lines


def generate(source: Path, folder: Path, generator: ConditioningGenerator) -> Generated:
    """Write the control image of every image under `source` into `folder` (source is only read)."""
    from simpletuner.data.storage import image_extensions

    if not source.is_dir():
        raise UserError(f"conditioning generator: {source} is not a folder")
    result = Generated(folder)
    extensions = image_extensions()
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in extensions:
            continue
        relative = path.relative_to(source)
        target = (folder / relative).with_suffix(".png")
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            result.kept += 1
            continue
        try:
            edges = canny(_read_rgb(path), generator.low_threshold, generator.high_threshold)
        except (OSError, ValueError) as error:
            result.failed.append(f"{relative}: {error}")
            continue
        _write_png(edges, target)
        result.written += 1
    return result


def _read_rgb(path: Path) -> np.ndarray:
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def canny(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV's Canny edges of an RGB uint8 image, as an RGB image (white edges on black)."""
    try:
        import cv2
    except ImportError as error:
        raise UserError("conditioning type 'canny' needs OpenCV: pip install 'simpletuner[controlnet]' "
                        "(opencv-python-headless)") from error
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


def _write_png(array: np.ndarray, target: Path) -> None:
    from PIL import Image

    with written_atomically(target) as temp:
        Image.fromarray(array).save(temp, format="PNG")
