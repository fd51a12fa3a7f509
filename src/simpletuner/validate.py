"""Validation images during training: prompts x resolutions x seeds, saved as PNGs and logged.

Images go to output_dir/validation/step-N/<prompt name>-<width>x<height>-<index>.png;
step 0 holds the base model's images, kept for comparison. A ControlNet pipeline samples from a control
image of each size (from the conditioning datasets), saved beside its results as
<prompt name>-<width>x<height>-control.png and logged first in their group.
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
class ValidationPlan:
    prompts: dict[str, str]  # name -> prompt
    resolutions: list[tuple[int, int]]  # (width, height)
    seed: int
    chain: StageChain | None = None  # the other stage of a two-expert validation (validate_chain)


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
    return ValidationPlan(prompts, parse_resolutions(text, family.alignment), cfg.validation_seed,
                          StageChain.from_config(cfg))


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
                   step: int, tracker: Tracker | None = None, init_images: dict[tuple[int, int], Any] | None = None
                   ) -> list[Path]:
    """Sample every prompt at every resolution; save PNGs; log them; return the files."""
    import torch

    folder = Path(cfg.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = family.pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    denoiser = next(family.denoiser(components).parameters())
    device = denoiser.device
    written: list[Path] = []
    logged: dict[str, list[Any]] = {}
    for name, prompt in plan.prompts.items():
        for width, height in plan.resolutions:
            generator = torch.Generator(device="cpu").manual_seed(plan.seed)
            with torch.no_grad(), _autocast_if_mixed(components, device):
                if plan.chain is not None:
                    images = plan.chain.sample(pipeline, cfg, prompt, width, height, generator, device,
                                               denoiser.dtype)
                else:
                    images = family.sample_images(pipeline, cfg, prompt, width, height, generator,
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
    if plan.chain is not None:
        plan.chain.park()
    if tracker is not None:
        tracker.log_images(logged, step)
    logger.info("validation step %d: %d images in %s (on %s)", step, len(written), folder, device)
    return written
