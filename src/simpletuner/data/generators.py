"""Conditioning generators: control images made from a dataset's own images (`conditioning: [{type: canny}]`).

`with_generated_conditioning` turns an image dataset's generator into a conditioning dataset of its own
(id `<id>_conditioning_<type>`, paired through `conditioning_data`) whose folder lies under
`<cache_dir>/conditioning/<id>/<type>-<settings>/`, never in the source (a local folder, an S3 prefix or a
Hugging Face dataset, read through `open_source`). `generate` writes one PNG per source image there, at the
source's relative path (a Hugging Face row's name, `row-000012`, for its rows), each under a temporary name
then renamed; an image already generated from the same source (`<folder>.source`, beside the folder, names its
URL, which for a Hugging Face dataset holds its fingerprint) and newer than its source image is kept; a source
image that cannot be read is reported and left out (its image then has no partner: a counted skip). Canny
edges come from OpenCV (the `controlnet` extra).
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
    from simpletuner.data.hf import HuggingFaceStorage
    from simpletuner.data.storage import DatasetStorage

    Source = DatasetStorage | HuggingFaceStorage


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
    from simpletuner.config.conditioning import generator_problems

    problems = generator_problems(settings.training, dataset)
    if problems:
        raise ConfigError(problems[0])
    return dataset.conditioning[0]


def generate_all(settings: Settings, original: Settings) -> list[str]:
    """Generate the control images of every generator in `original`'s datasets; one report line each."""
    from simpletuner.data.storage import open_source

    lines = []
    for dataset in original.datasets:
        if dataset.conditioning and not dataset.disabled:
            generator = dataset.conditioning[0]
            result = generate(open_source(dataset), generated_folder(settings.training.cache_dir, dataset.id,
                                                                     generator), generator)
            lines.append(result.report(generated_id(dataset.id, generator)))
    return lines


SOURCE_NOTE = ".source"  # <generated folder>.source: the URL of the source its images were made from


def generate(source: Source, folder: Path, generator: ConditioningGenerator) -> Generated:
    """Write the control image of every image of `source` into the local `folder` (the source is only read)."""
    result = Generated(folder)
    note = folder.with_name(folder.name + SOURCE_NOTE)  # beside the folder: no stray file among the images
    same_source = note.is_file() and note.read_text() == source.url
    for entry in source.list_images():
        target = (folder / entry.path).with_suffix(".png")
        if same_source and target.is_file() and target.stat().st_mtime >= entry.mtime:
            result.kept += 1
            continue
        try:
            edges = canny(_decode_rgb(source.read_bytes(entry.path)), generator.low_threshold,
                          generator.high_threshold)
        except (OSError, ValueError) as error:
            result.failed.append(f"{entry.path}: {error}")
            continue
        _write_png(edges, target)
        result.written += 1
    if not same_source:
        folder.mkdir(parents=True, exist_ok=True)
        with written_atomically(note) as temp:
            temp.write_text(source.url)
    return result


def _decode_rgb(data: bytes) -> np.ndarray:
    import io

    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("no image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except UnidentifiedImageError as error:
        raise ValueError(str(error)) from error


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
