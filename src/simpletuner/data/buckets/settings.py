"""A dataset's bucket settings (checked when built) and the reasons an image is left out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig

# SimpleTuner's remapping of round megapixel values to familiar squares.
_AREA_SQUARES = {0.25: 512**2, 0.5: 768**2, 1.0: 1024**2, 2.0: 1536**2, 4.0: 2048**2}
_RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
_CROP_STYLES = ("center", "centre", "random", "corner")
_CROP_ASPECTS = ("square", "preserve", "closest", "random")
_SMALL_BUCKET_POLICIES = ("merge", "drop")
_MAX_AREA_MEGAPIXELS = 64.0  # area values above this are surely pixels given with the wrong type

# Skip kinds (the keys of a SkipReport) and what a person can do about each.
TOO_SMALL = "too small"
WOULD_UPSCALE = "would upscale"
INVALID_SIZE = "invalid size"
SMALL_BUCKET = "small bucket"
_HINTS = {
    TOO_SMALL: "lower minimum_image_size",
    WOULD_UPSCALE: "set prevent_upscaling to false or lower the resolution",
    SMALL_BUCKET: "lower train_batch_size, add images, or use small_bucket_policy 'merge'",
}


@dataclass(frozen=True, slots=True)
class Skip:
    """An image left out of training: `kind` groups it in reports, `reason` explains it."""

    kind: str
    reason: str


@dataclass(frozen=True)
class BucketSettings:
    """Everything that decides an image's bucket, resize and crop (one dataset's view)."""

    resolution: float
    resolution_type: str
    alignment: int
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    prevent_upscaling: bool = False
    crop: bool = False
    crop_style: str = "random"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] = ()
    small_bucket_policy: str = "merge"
    aspect_rounding: int | None = None  # decimal places of image aspect ratios (aspect_bucket_rounding)

    def __post_init__(self) -> None:
        _check_settings(self)

    @classmethod
    def from_config(cls, dataset: DatasetConfig, training: TrainingConfig, alignment: int,
                    native_resolution: int = 1024) -> BucketSettings:
        """The dataset's settings; unset values fall back to the training ones, then to the family's native
        resolution (pixels); the family's alignment wins."""
        resolution_type = dataset.resolution_type or training.resolution_type
        minimum = dataset.minimum_image_size
        resolution = dataset.resolution if dataset.resolution is not None else training.resolution
        if resolution is None:
            resolution = (native_resolution / 1024) ** 2 if resolution_type == "area" else native_resolution
        try:
            return cls(
                resolution=float(resolution),
                resolution_type=resolution_type,
                alignment=alignment,
                minimum_image_size=minimum if minimum is not None else training.minimum_image_size,
                maximum_image_size=dataset.maximum_image_size,
                target_downsample_size=dataset.target_downsample_size,
                prevent_upscaling=dataset.prevent_upscaling,
                crop=dataset.crop,
                crop_style=dataset.crop_style,
                crop_aspect=dataset.crop_aspect,
                crop_aspect_buckets=tuple(float(a) for a in dataset.crop_aspect_buckets or ()),
                small_bucket_policy=dataset.small_bucket_policy,
                aspect_rounding=training.aspect_bucket_rounding,
            )
        except ConfigError as error:
            raise ConfigError(f"dataset {dataset.id!r}: {error}") from None

    @property
    def is_random(self) -> bool:
        """Whether plans depend on the per-image seed (random crops or random aspects)."""
        return self.crop and (self.crop_style == "random" or self.crop_aspect == "random")

    @property
    def crops_vary(self) -> bool:
        """Whether a crop position can be drawn again for an image already in its bucket (random crops)."""
        return self.crop and self.crop_style == "random"

    def area_pixels(self, value: float) -> float:
        """A size option (resolution, minimum...) as a pixel area; area types only."""
        if self.resolution_type == "pixel_area":
            return value * value
        return float(_AREA_SQUARES.get(value, value * 1e6))


def _check_settings(s: BucketSettings) -> None:
    _check_choice("resolution_type", s.resolution_type, _RESOLUTION_TYPES)
    _check_choice("crop_style", s.crop_style, _CROP_STYLES)
    _check_choice("crop_aspect", s.crop_aspect, _CROP_ASPECTS)
    _check_choice("small_bucket_policy", s.small_bucket_policy, _SMALL_BUCKET_POLICIES)
    if s.aspect_rounding is not None and not 1 <= s.aspect_rounding <= 9:
        raise ConfigError(f"aspect_bucket_rounding must be 1 to 9 decimal places, got {s.aspect_rounding}")
    if s.alignment < 1:
        raise ConfigError(f"alignment must be a positive number of pixels, got {s.alignment}")
    if s.resolution_type == "area" and s.resolution > _MAX_AREA_MEGAPIXELS:
        raise ConfigError(
            f"resolution {s.resolution:g} with resolution_type 'area' means {s.resolution:g} megapixels; "
            "for a size in pixels use resolution_type 'pixel' or 'pixel_area'"
        )
    if s.resolution_type != "area" and s.resolution < s.alignment:
        raise ConfigError(
            f"resolution {s.resolution:g} is below the alignment of {s.alignment} pixels "
            f"(resolution_type {s.resolution_type!r} reads it in pixels; for megapixels use 'area')"
        )
    if (s.maximum_image_size is None) != (s.target_downsample_size is None):
        raise ConfigError(
            "maximum_image_size and target_downsample_size go together: got "
            f"maximum_image_size={s.maximum_image_size}, target_downsample_size={s.target_downsample_size}"
        )
    if s.crop and s.crop_aspect in ("closest", "random"):
        if not s.crop_aspect_buckets:
            raise ConfigError(f"crop_aspect {s.crop_aspect!r} needs crop_aspect_buckets, e.g. [0.75, 1.0, 1.33]")
        bad = [a for a in s.crop_aspect_buckets if not a > 0]
        if bad:
            raise ConfigError(f"crop_aspect_buckets must be positive aspect ratios (width/height), got {bad}")


def _check_choice(key: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{key} {value!r} is not one of {', '.join(accepted)}")
