"""Validation images during training: prompts x resolutions x seeds, saved as PNGs and logged.

Images go to output_dir/validation/step-N/<prompt name>-<width>x<height>-<index>.png;
step 0 holds the base model's images, kept for comparison. A ControlNet pipeline samples from a control
image of each size (from the conditioning datasets), saved beside its results as
<prompt name>-<width>x<height>-control.png and logged first in their group. With
`validation_conditioning_images` (files) or `num_eval_images` (control images of the conditioning datasets)
it samples every prompt from each of those control images instead: results
<prompt name>-<width>x<height>-<control>-<index>.png beside <prompt name>-<width>x<height>-<control>-control.png,
and one grid per prompt (a row per control image: the control image, then its results) to the tracker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.trackers import Tracker
    from simpletuner.validate_chain import StageChain

logger = get_logger(__name__)


@dataclass(frozen=True)
class ControlInput:
    """A control image that ControlNet validation samples from."""

    tag: str  # names its files
    image: Any  # PIL image, RGB
    size: tuple[int, int] | None = None  # (width, height) to sample at; None: each validation resolution


@dataclass(frozen=True)
class ValidationPlan:
    prompts: dict[str, str]  # name -> prompt
    resolutions: list[tuple[int, int]]  # (width, height)
    seed: int
    chain: StageChain | None = None  # the other stage of a two-expert validation (validate_chain)
    controls: tuple[ControlInput, ...] = ()  # validation_conditioning_images
    eval_images: int = 0  # num_eval_images of a ControlNet run: control images drawn from its datasets


def parse_resolutions(text: str, alignment: int) -> list[tuple[int, int]]:
    """'1024' or '1024x768,768x1024' -> [(w, h), ...], each side a multiple of `alignment`."""
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match:
            raise ConfigError(f"validation_resolution: {part!r} is not a size; use e.g. '1024' or '1024x768'")
        width = int(match.group(1))
        height = int(match.group(2) or width)
        if width % alignment or height % alignment or not width or not height:
            raise ConfigError(f"validation_resolution: {width}x{height} is not a multiple of {alignment} pixels, "
                              "which this model family needs")
        sizes.append((width, height))
    return sizes


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] or "prompt"


def validation_plan(cfg: TrainingConfig, family: ModelFamily) -> ValidationPlan | None:
    """What to sample, or None when validation is off or has no prompt."""
    if cfg.disable_validation:
        return None
    prompts: dict[str, str] = {}
    if cfg.validation_prompt:
        prompts["validation"] = cfg.validation_prompt
    if cfg.user_prompt_library:
        path = Path(cfg.user_prompt_library)
        try:
            library = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"user_prompt_library {path}: cannot be read as JSON ({error})") from error
        if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
            raise ConfigError(f"user_prompt_library {path}: must be a JSON object of name -> prompt")
        prompts.update({_slug(name): prompt for name, prompt in library.items()})
    if not prompts:
        return None
    if cfg.validation_guidance_skip_layers and not family.skip_layer_guidance:
        logger.warning("validation_guidance_skip_layers is ignored for model_family %r: its pipeline has no "
                       "skip-layer guidance (SimpleTuner drops it too)", cfg.model_family)
    from simpletuner.validate_chain import StageChain

    text = cfg.validation_resolution or str(family.default_resolution(cfg))
    if (cfg.validation_conditioning_images or cfg.num_eval_images) and not cfg.controlnet:
        logger.warning("validation_conditioning_images and num_eval_images are read by ControlNet validation only "
                       "(controlnet=true); ignored")
    controls = tuple(control_file(path) for path in cfg.validation_conditioning_images or ()) \
        if cfg.controlnet else ()
    return ValidationPlan(prompts, parse_resolutions(text, family.alignment), cfg.validation_seed,
                          StageChain.from_config(cfg), controls, (cfg.num_eval_images or 0) if cfg.controlnet else 0)


def control_file(path: str) -> ControlInput:
    """A control image from validation_conditioning_images, read now (a bad file stops the run before training)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"validation_conditioning_images: {path} cannot be read as an image ({error})") from error
    return control_input(Path(path).stem, rgb)


def control_input(name: str, image: Any, size: tuple[int, int] | None = None) -> ControlInput:
    """A control image for validation, its files named after `name`."""
    return ControlInput(_slug(name), image, size)


def _autocast_if_mixed(components: Components, device: Any) -> Any:
    """Autocast to the half dtype when components differ in dtype (e.g. a bf16 VAE beside an fp32 UNet)."""
    import contextlib

    import torch

    dtypes = {module.dtype for module in components.modules.values() if isinstance(module, torch.nn.Module)}
    half = [dtype for dtype in (torch.bfloat16, torch.float16) if dtype in dtypes]
    if len(dtypes) < 2 or not half:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=half[0])


def run_validation(plan: ValidationPlan, family: ModelFamily, components: Components, cfg: TrainingConfig,
                   step: int, tracker: Tracker | None = None, init_images: dict[tuple[int, int], Any] | None = None,
                   controls: list[ControlInput] | None = None) -> list[Path]:
    """Sample every prompt at every resolution (or from every control input); save PNGs; log them; return the
    files."""
    folder = Path(cfg.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = family.pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    weights = next(family.denoiser(components).parameters())
    if controls:
        written, logged = _sample_controls(plan, family, pipeline, components, cfg, folder, weights, controls)
    else:
        written, logged = _sample_sizes(plan, family, pipeline, components, cfg, folder, weights, init_images)
    if plan.chain is not None:
        plan.chain.park()
    if tracker is not None:
        tracker.log_images(logged, step)
    logger.info("validation step %d: %d images in %s (on %s)", step, len(written), folder, weights.device)
    return written


def _sample(family: ModelFamily, pipeline: Any, components: Components, cfg: TrainingConfig, plan: ValidationPlan,
            prompt: str, size: tuple[int, int], weights: Any, init_image: Any) -> list[Any]:
    """One prompt at one size (through the other expert too, with a chain); `weights`: a denoiser parameter."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(plan.seed)
    with torch.no_grad(), _autocast_if_mixed(components, weights.device):
        if plan.chain is not None:
            return plan.chain.sample(pipeline, cfg, prompt, size[0], size[1], generator, weights.device,
                                     weights.dtype)
        return family.sample_images(pipeline, cfg, prompt, size[0], size[1], generator, init_image)


def _sample_controls(plan: ValidationPlan, family: ModelFamily, pipeline: Any, components: Components,
                     cfg: TrainingConfig, folder: Path, weights: Any, controls: list[ControlInput]
                     ) -> tuple[list[Path], dict[str, list[Any]]]:
    """Every prompt from every control image; each result saved beside its control image; a grid per prompt."""
    from PIL import ImageOps

    written: list[Path] = []
    logged: dict[str, list[Any]] = {}
    for name, prompt in plan.prompts.items():
        rows = []
        for control in controls:
            for size in [control.size] if control.size else plan.resolutions:
                image = control.image if control.image.size == size else ImageOps.fit(control.image, size)
                stem = f"{name}-{size[0]}x{size[1]}-{control.tag}"
                image.save(folder / f"{stem}-control.png")
                images = _sample(family, pipeline, components, cfg, plan, prompt, size, weights, image)
                for index, result in enumerate(images):
                    path = folder / f"{stem}-{index}.png"
                    result.save(path)
                    written.append(path)
                rows.append([image, *images])
        logged[f"validation/{name}-grid"] = [image_grid(rows)]
    return written, logged


def image_grid(rows: list[list[Any]]) -> Any:
    """One image of `rows` of images, each in a cell as large as the largest, on black."""
    from PIL import Image

    width = max(image.width for row in rows for image in row)
    height = max(image.height for row in rows for image in row)
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB"), (x * width, y * height))
    return grid


def _sample_sizes(plan: ValidationPlan, family: ModelFamily, pipeline: Any, components: Components,
                  cfg: TrainingConfig, folder: Path, weights: Any, init_images: dict[tuple[int, int], Any] | None
                  ) -> tuple[list[Path], dict[str, list[Any]]]:
    written: list[Path] = []
    logged: dict[str, list[Any]] = {}
    for name, prompt in plan.prompts.items():
        for width, height in plan.resolutions:
            images = _sample(family, pipeline, components, cfg, plan, prompt, (width, height), weights,
                             (init_images or {}).get((width, height)))
            for index, image in enumerate(images):
                path = folder / f"{name}-{width}x{height}-{index}.png"
                image.save(path)
                written.append(path)
            control = (init_images or {}).get((width, height)) if "controlnet" in pipeline.components else None
            if control is not None:
                control.save(folder / f"{name}-{width}x{height}-control.png")
                images = [control, *images]
            logged[f"validation/{name}-{width}x{height}"] = images
    return written, logged
