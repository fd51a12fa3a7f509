"""One image's plan: the bucket it trains at, how it is resized and where it is cropped (pure functions)."""

from __future__ import annotations

import hashlib
import math
import random

from simpletuner.data.buckets.settings import INVALID_SIZE, TOO_SMALL, WOULD_UPSCALE, BucketSettings, Skip
from simpletuner.data.records import ImagePlan


def image_seed(seed: int | None, path: str) -> int:
    """A per-image seed from the run's seed and the image's path: same input, same crop."""
    digest = hashlib.blake2b(f"{seed}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_image_seed(seed: int | None, path: str, epoch: int) -> int:
    """The per-image seed of an epoch's crop: `image_seed` in epoch 0, a fresh one in every later epoch."""
    if epoch == 0:
        return image_seed(seed, path)
    digest = hashlib.blake2b(f"{seed}\0{path}\0epoch {epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def redraw_crop(plan: ImagePlan, settings: BucketSettings, rng_seed: int) -> ImagePlan:
    """The same image in the same bucket, resized the same, with its crop position drawn again.

    Only random crop positions (crop on, crop_style random) change; any other plan comes back as it is.
    The bucket stays, so a crop_aspect drawn at random keeps the aspect it was given.
    """
    if not settings.crops_vary:
        return plan
    again = plan_for_target(*plan.original_size, plan.target_size, settings, rng_seed)
    return plan if isinstance(again, Skip) else again


def align(value: float, alignment: int) -> int:
    """The multiple of `alignment` nearest to `value`, at least `alignment`."""
    return max(alignment, int(math.floor(value / alignment + 0.5)) * alignment)


def image_aspect(width: int, height: int, settings: BucketSettings) -> float:
    """width / height, rounded to settings.aspect_rounding decimal places when set (at least 10^-places)."""
    aspect = width / height
    places = settings.aspect_rounding
    if places is None:
        return aspect
    return max(round(aspect, places), 10.0**-places)


def target_size_for_aspect(aspect: float, settings: BucketSettings) -> tuple[int, int]:
    """The bucket (width, height) for an aspect ratio (width / height)."""
    g = settings.alignment
    if settings.resolution_type == "pixel":
        short = align(settings.resolution, g)
        if aspect >= 1:
            return align(short * aspect, g), short
        return short, align(short / aspect, g)
    area = settings.area_pixels(settings.resolution)
    return align(math.sqrt(area * aspect), g), align(math.sqrt(area / aspect), g)


def plan_image(width: int, height: int, settings: BucketSettings, rng_seed: int | None = None) -> ImagePlan | Skip:
    """How an image of this size trains: resize, crop box and target size, or why it is skipped.

    `rng_seed` drives the random choices (crop position, random aspect); give
    `image_seed(seed, path)` so that an image always gets the same plan.
    """
    problem = _size_problem(width, height, settings)
    if problem is not None:
        return problem
    if not settings.crop:
        target = target_size_for_aspect(image_aspect(width, height, settings), settings)
        if settings.prevent_upscaling and (target[0] > width or target[1] > height):
            return _upscale_skip(width, height, target)
        return ImagePlan((width, height), target, (0, 0, target[0], target[1]), target)
    rng = random.Random(rng_seed if rng_seed is not None else 0)
    target = target_size_for_aspect(_crop_aspect(width, height, settings, rng), settings)
    return _cover_and_crop(width, height, target, settings, rng)


def plan_for_target(
    width: int, height: int, target: tuple[int, int], settings: BucketSettings, rng_seed: int | None = None
) -> ImagePlan | Skip:
    """Plan an image for a given bucket: resize to cover it, then crop (used when buckets merge).

    Without `crop` the crop is centred: stretching an image to another bucket's aspect
    would distort it more than trimming the sliver that does not fit.
    """
    problem = _size_problem(width, height, settings)
    if problem is not None:
        return problem
    return _cover_and_crop(width, height, target, settings, random.Random(rng_seed if rng_seed is not None else 0))


def _size_problem(width: int, height: int, s: BucketSettings) -> Skip | None:
    if width <= 0 or height <= 0:
        return Skip(INVALID_SIZE, f"invalid size {width}x{height}")
    minimum = s.minimum_image_size
    if minimum is None:
        return None
    if s.resolution_type == "pixel":
        if min(width, height) < minimum:
            return Skip(TOO_SMALL, f"too small: {width}x{height} < minimum {minimum:g} per side")
    elif width * height < s.area_pixels(minimum):
        unit = "MP" if s.resolution_type == "area" else "px (pixel_area)"
        return Skip(TOO_SMALL, f"too small: {width}x{height} < minimum {minimum:g} {unit}")
    return None


def _upscale_skip(width: int, height: int, resized: tuple[int, int]) -> Skip:
    return Skip(WOULD_UPSCALE, f"would upscale: {width}x{height} -> {resized[0]}x{resized[1]} (prevent_upscaling)")


def _crop_aspect(width: int, height: int, s: BucketSettings, rng: random.Random) -> float:
    if s.crop_aspect == "square":
        return 1.0
    aspect = image_aspect(width, height, s)
    if s.crop_aspect == "preserve":
        return aspect
    closest = min(s.crop_aspect_buckets, key=lambda a: abs(math.log(a) - math.log(aspect)))
    if s.crop_aspect == "closest":
        return closest
    # random: any bucket the image covers without upscaling (as SimpleTuner), else the closest
    fitting = [a for a in s.crop_aspect_buckets if _fits(target_size_for_aspect(a, s), width, height)]
    return rng.choice(fitting) if fitting else closest


def _fits(target: tuple[int, int], width: int, height: int) -> bool:
    return target[0] <= width and target[1] <= height


def _cover_and_crop(
    width: int, height: int, target: tuple[int, int], s: BucketSettings, rng: random.Random
) -> ImagePlan | Skip:
    scale = max(target[0] / width, target[1] / height)
    if s.maximum_image_size is not None and _exceeds_maximum(width, height, s):
        scale = max(scale, min(1.0, _downsample_scale(width, height, s)))
    resized = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    if s.prevent_upscaling and scale > 1.0:
        return _upscale_skip(width, height, resized)
    left, top = _crop_origin(resized, target, s.crop_style if s.crop else "center", rng)
    return ImagePlan((width, height), resized, (left, top, left + target[0], top + target[1]), target)


def _exceeds_maximum(width: int, height: int, s: BucketSettings) -> bool:
    assert s.maximum_image_size is not None
    if s.resolution_type == "pixel":
        return max(width, height) > s.maximum_image_size
    return width * height > s.area_pixels(s.maximum_image_size)


def _downsample_scale(width: int, height: int, s: BucketSettings) -> float:
    assert s.target_downsample_size is not None
    if s.resolution_type == "pixel":
        return s.target_downsample_size / min(width, height)
    return math.sqrt(s.area_pixels(s.target_downsample_size) / (width * height))


def _crop_origin(
    resized: tuple[int, int], target: tuple[int, int], style: str, rng: random.Random
) -> tuple[int, int]:
    spare_x, spare_y = resized[0] - target[0], resized[1] - target[1]
    if style in ("center", "centre"):
        return spare_x // 2, spare_y // 2
    if style == "corner":  # SimpleTuner's corner crop keeps the bottom-right corner
        return spare_x, spare_y
    return rng.randint(0, spare_x), rng.randint(0, spare_y)
