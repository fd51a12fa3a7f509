"""Validation that chains two experts: the first stage denoises its share of the schedule, the second finishes.

- `validation_base_model` names the first stage (a pipeline folder or Hub id) when the trained model is the
  second (`refiner_training` without `refiner_training_invert_schedule`: an SDXL refiner, or a second-stage
  expert).
- `validation_refiner_model` names the second stage (e.g. the SDXL refiner) when the trained model is the first.

The split is diffusers' own: the first pipeline runs with `denoising_end = 1 - refiner_training_strength` and
returns latents, the second takes them with `denoising_start` at the same point (the schedule the refiner
learned). Only the SDXL and Kolors pipelines have these arguments (the schema refuses the options elsewhere).
The other stage is loaded once, on first use, and waits on the CPU between validations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    import torch

    from simpletuner.config.schema import TrainingConfig

logger = get_logger(__name__)


@dataclass
class StageChain:
    """The other stage of a two-expert validation and where the schedule is split."""

    source: str  # the other stage's pipeline (folder or Hub id)
    option: str  # the option that named it, for messages
    trained_first: bool  # the trained model is the first stage (validation_refiner_model)
    split: float  # the first stage's denoising_end and the second's denoising_start
    _other: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: TrainingConfig) -> StageChain | None:
        split = 1.0 - cfg.refiner_training_strength
        if cfg.validation_base_model:
            return cls(cfg.validation_base_model, "validation_base_model", False, split)
        if cfg.validation_refiner_model:
            return cls(cfg.validation_refiner_model, "validation_refiner_model", True, split)
        return None

    def other(self, device: torch.device, dtype: torch.dtype) -> Any:
        """The other stage's pipeline on `device` (loaded once)."""
        if self._other is None:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            auto = AutoPipelineForImage2Image if self.trained_first else AutoPipelineForText2Image
            try:
                self._other = auto.from_pretrained(self.source, dtype=dtype)
            except (OSError, ValueError) as error:
                raise ConfigError(f"{self.option}={self.source!r}: cannot be loaded as a diffusers pipeline "
                                  f"({error})") from error
            self._other.set_progress_bar_config(disable=True)
            logger.info("validation chains %s (%s stage) with the trained model", self.source,
                        "second" if self.trained_first else "first")
        return self._other.to(device)

    def park(self) -> None:
        """Move the other stage back to the CPU after a validation."""
        if self._other is not None:
            self._other.to("cpu")

    def sample(self, trained: Any, cfg: TrainingConfig, prompt: str, width: int, height: int,
               generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> list[Any]:
        """Images (PIL) of the two stages chained: the first to `split`, then the second from there."""
        other = self.other(device, dtype)
        first, second = (trained, other) if self.trained_first else (other, trained)
        first, second = _stage(first, "denoising_end", self), _stage(second, "denoising_start", self)
        common = dict(prompt=prompt, negative_prompt=cfg.validation_negative_prompt,
                      num_inference_steps=cfg.validation_num_inference_steps, guidance_scale=cfg.validation_guidance,
                      generator=generator, num_images_per_prompt=cfg.num_validation_images)
        latents = first(**common, width=width, height=height, denoising_end=self.split, output_type="latent").images
        return second(**common, image=latents, denoising_start=self.split).images


def _stage(pipeline: Any, argument: str, chain: StageChain) -> Any:
    """The pipeline in the form its stage needs (text-to-image first, image-to-image second), or a ConfigError."""
    from diffusers import AutoPipelineForImage2Image

    if argument == "denoising_start" and argument not in inspect.signature(pipeline.__call__).parameters:
        try:
            pipeline = AutoPipelineForImage2Image.from_pipe(pipeline)
        except ValueError as error:
            raise ConfigError(f"{chain.option}: {type(pipeline).__name__} has no image-to-image form to run as "
                              f"the second stage ({error})") from error
    parameters = inspect.signature(pipeline.__call__).parameters
    if argument == "denoising_end" and "image" in parameters:
        raise ConfigError(f"{chain.option}: {type(pipeline).__name__} refines an input image and cannot run as the "
                          "first stage; the first stage is a text-to-image pipeline (e.g. the SDXL base)")
    if argument not in parameters:
        stage = "second" if argument == "denoising_start" else "first"
        raise ConfigError(f"{chain.option}: {type(pipeline).__name__} cannot run as the {stage} stage: diffusers "
                          f"gives it no {argument}; chain an SDXL base with an SDXL refiner (or Kolors stages)")
    return pipeline
