"""Aspect buckets: which size each image trains at, and how it gets there.

Pure functions. `plan_image` turns an image's size and the dataset's settings into
an `ImagePlan` (resize, then crop to the bucket's target size) or a `Skip` with
its reason; `assign_buckets` plans a whole index, groups images by target size,
folds buckets smaller than a batch into their nearest neighbour (or drops them,
reported) and counts every excluded image by reason.

Resolution (as SimpleTuner reads it; `a` is the aspect ratio width/height, `g` the
model family's alignment):

* ``pixel``: the shorter side is `resolution` rounded to a multiple of g; the
  longer side is the multiple of g nearest to shorter * a (or shorter / a).
* ``area``: `resolution` is in megapixels; the round values SimpleTuner remaps
  keep their familiar squares (0.25 -> 512², 0.5 -> 768², 1.0 -> 1024²,
  2.0 -> 1536², 4.0 -> 2048²); any other value v is v * 10⁶ pixels. Each target
  side is the multiple of g nearest to its ideal side sqrt(A * a) or sqrt(A / a).
* ``pixel_area``: `resolution` in pixels, the target area is resolution².

minimum_image_size, maximum_image_size and target_downsample_size are read in the
same unit as the resolution (pixel: per side; area: megapixels with the same
remapping; pixel_area: pixels whose square is the area).

Crop off: the image is resized straight to its bucket (aspect distortion within
the bounds below). Crop on: the bucket's aspect comes from crop_aspect (square,
the image's own, the closest or a random one of crop_aspect_buckets); the image is
resized, aspect kept, just enough to cover the bucket (or, when it exceeds
maximum_image_size, down to target_downsample_size if that still covers it) and
the bucket is cropped out of it at the crop_style position. Unlike SimpleTuner,
which crops at the image's native resolution unless maximum_image_size is set,
crops here always see the whole image scaled to the bucket.

aspect_bucket_rounding (SimpleTuner's option): an image's own aspect ratio
(width/height) is rounded to that many decimal places before its bucket is computed
(crop off, crop_aspect preserve and closest), so images whose rounded aspects are
equal share a bucket; unset, the exact ratio is used. A ratio that rounds to 0 is
taken as the smallest step, 10^-places.

Bounds, with (w, h) the ideal target sides computed from the aspect ratio (rounded,
with aspect_bucket_rounding) before aligning (asserted by the property tests):

* every target side is a positive multiple of g;
* every target side is within g/2 of its ideal, or equals g where the ideal is
  below g; so the target's area is within factors (1 - g/2w)(1 - g/2h) and
  (1 + g/2w)(1 + g/2h) of the ideal area (area types), and its aspect ratio within
  (1 - g/2w)/(1 + g/2h) and (1 + g/2w)/(1 - g/2h) of the ideal aspect;
* crop on: the resized image keeps the original aspect to within half a pixel
  per side, covers the target, and the crop box lies inside it and has the
  target's size; crop off: resized size == target size, crop box == whole image.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from simpletuner.data.records import ImagePlan, ImageRecord
from simpletuner.errors import ConfigError, DataError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig

logger = get_logger(__name__)

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


# --------------------------------------------------------------------------- reports


@dataclass
class SkipReport:
    """Images left out, counted by kind, with a few examples ("path: reason") of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, kind: str, count: int = 1, example: str | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + count
        shown = self.examples.setdefault(kind, [])
        if example is not None and len(shown) < self.max_examples:
            shown.append(example)

    def update(self, other: SkipReport) -> None:
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
            room = self.max_examples - len(self.examples.setdefault(kind, []))
            self.examples[kind].extend(other.examples.get(kind, [])[:max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One line per kind, most frequent first: '5 too small (e.g. a.jpg: too small: ...)'."""
        out = []
        for kind, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = self.examples.get(kind) or []
            out.append(f"{count} {kind}" + (f" (e.g. {'; '.join(shown)})" if shown else ""))
        return out


@dataclass(frozen=True, slots=True)
class BucketMerge:
    """A bucket smaller than a batch whose images were re-planned into another bucket."""

    source: tuple[int, int]
    into: tuple[int, int]
    images: int


@dataclass(frozen=True, slots=True)
class BucketRow:
    """One line of the bucket table: target size, images, full batches."""

    size: tuple[int, int]
    images: int
    batches: int


# Columns of BucketAssignment.plan_table.
_PLAN_COLUMNS = 8  # original w, h, resized w, h, crop left, top, target w, h


@dataclass(frozen=True, eq=False)
class BucketAssignment:
    """A dataset's usable images grouped by bucket, with each one's plan; compact for millions.

    Records are referred to by their position in `records` (the index handed to
    `assign_buckets`). Bucket `b` holds `order[bucket_offsets[b]:bucket_offsets[b+1]]`.
    """

    records: Sequence[ImageRecord]
    batch_size: int
    buckets: tuple[tuple[int, int], ...]
    bucket_offsets: np.ndarray  # int64, len(buckets) + 1
    order: np.ndarray  # record positions grouped by bucket
    record_plan: np.ndarray  # int32 row of plan_table per record; -1 for an excluded record
    plan_table: np.ndarray  # (rows, 8) int32, see _PLAN_COLUMNS
    skipped: SkipReport
    merges: tuple[BucketMerge, ...] = ()
    settings: BucketSettings | None = None  # what planned it (None: plans cannot be drawn again)
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def bucket_counts(self) -> np.ndarray:
        return np.diff(self.bucket_offsets)

    def bucket_records(self, bucket: int) -> np.ndarray:
        return self.order[self.bucket_offsets[bucket] : self.bucket_offsets[bucket + 1]]

    def plan(self, record: int) -> ImagePlan:
        """The plan of the record at this position of `records`."""
        row = int(self.record_plan[record])
        if row < 0:
            raise KeyError(f"record {record} ({self.records[record].path}) is not in any bucket")
        ow, oh, rw, rh, left, top, tw, th = (int(v) for v in self.plan_table[row])
        return ImagePlan((ow, oh), (rw, rh), (left, top, left + tw, top + th), (tw, th))

    def epoch_plan(self, record: int, epoch: int) -> ImagePlan:
        """The record's plan in an epoch: its own plan in epoch 0; later, a random crop drawn again for the
        epoch (same bucket and resize), see `redraw_crop`."""
        plan = self.plan(record)
        if epoch == 0 or self.settings is None:
            return plan
        return redraw_crop(plan, self.settings, epoch_image_seed(self.seed, self.records[record].path, epoch))

    def plans(self) -> Iterator[tuple[int, ImagePlan]]:
        """(record position, plan) of every usable image, bucket by bucket."""
        chunk = 1 << 16
        for start in range(0, len(self.order), chunk):
            for record in self.order[start : start + chunk].tolist():
                yield record, self.plan(record)

    def table(self) -> list[BucketRow]:
        """The bucket table: target size, images, full batches."""
        return [
            BucketRow(size, int(count), int(count) // self.batch_size)
            for size, count in zip(self.buckets, self.bucket_counts())
        ]

    def without(self, records: Collection[int]) -> tuple[BucketAssignment, list[tuple[int, int]]]:
        """This assignment less `records` (positions in `records`), and the buckets that were left empty.

        Empty buckets are removed; every other bucket keeps its images in their order.
        """
        drop = np.zeros(len(self.records), dtype=bool)
        drop[np.fromiter(records, dtype=np.int64, count=len(records))] = True
        kept_buckets, emptied, parts = [], [], []
        for bucket, size in enumerate(self.buckets):
            members = self.bucket_records(bucket)
            members = members[~drop[members]]
            if len(members):
                kept_buckets.append(size)
                parts.append(members)
            else:
                emptied.append(size)
        record_plan = self.record_plan.copy()
        record_plan[drop] = -1
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(part) for part in parts])
        order = np.concatenate(parts) if parts else self.order[:0]
        return replace(self, buckets=tuple(kept_buckets), bucket_offsets=offsets, order=order,
                       record_plan=record_plan), emptied

    def upscaled(self, factor: float) -> tuple[int, list[str]]:
        """How many images are enlarged by more than `factor` per side to reach their bucket, and a few examples."""
        rows = self.record_plan[self.order]
        plans = self.plan_table[rows].astype(np.float64)
        scale = np.maximum(plans[:, 2] / np.maximum(plans[:, 0], 1), plans[:, 3] / np.maximum(plans[:, 1], 1))
        hits = np.flatnonzero(scale > factor)
        examples = []
        for i in hits[np.argsort(-scale[hits], kind="stable")][:3].tolist():
            ow, oh, rw, rh = (int(v) for v in plans[i, :4])
            examples.append(f"{self.records[int(self.order[i])].path}: {ow}x{oh} -> {rw}x{rh}")
        return len(hits), examples


# --------------------------------------------------------------------------- assignment


class NoUsableImages(DataError):
    """No image of a dataset is usable; `skipped` counts why each planned image was excluded."""

    def __init__(self, message: str, skipped: SkipReport) -> None:
        super().__init__(message)
        self.skipped = skipped


def assign_buckets(
    records: Sequence[ImageRecord],
    settings: BucketSettings,
    batch_size: int,
    *,
    seed: int | None,
    dataset_id: str = "dataset",
    upstream: SkipReport | None = None,
) -> BucketAssignment:
    """Plan every record, group by target size and settle buckets smaller than a batch.

    A small bucket (fewer images than `batch_size`) is merged into the nearest bucket
    by aspect ratio (then by area) whose target its images can be re-planned for
    (resize to cover, crop); with small_bucket_policy 'drop', or when no bucket can
    take it, it is dropped and counted under "small bucket". The sampler deals whole
    batches to ranks, so a bucket needs no more than one batch whatever the world size.

    `records` may be any sequence (a view over a columnar index, say); one that has a
    `sizes()` method returning an (n, 2) array of widths and heights is not walked
    record by record, which matters at millions of images.

    `upstream` holds the index's own skips (unreadable files...): they only feed the
    DataError raised when no image is usable, which explains every excluded group.
    """
    if batch_size < 1:
        raise ConfigError(f"train_batch_size must be at least 1, got {batch_size}")
    builder = _Builder(records, settings, seed, dataset_id)
    builder.plan_all()
    builder.settle_small_buckets(batch_size)
    assignment = builder.finish(batch_size)
    if len(assignment) == 0:
        raise NoUsableImages(_no_usable_message(dataset_id, len(records), assignment.skipped, upstream),
                             assignment.skipped)
    return assignment


class _Builder:
    """Plans keyed by distinct image size (or by record when plans are random)."""

    def __init__(
        self, records: Sequence[ImageRecord], settings: BucketSettings, seed: int | None, dataset_id: str
    ) -> None:
        self.records, self.settings, self.seed, self.dataset_id = records, settings, seed, dataset_id
        sizes = _record_sizes(records)
        self.index_dtype = np.int32 if len(records) < 2**31 else np.int64
        if settings.is_random:
            self.key_sizes, self.record_key = sizes, np.arange(len(records), dtype=self.index_dtype)
        else:
            self.key_sizes, self.record_key = _distinct_sizes(sizes, self.index_dtype)
        keys = len(self.key_sizes)
        self.plans = np.zeros((keys, _PLAN_COLUMNS), dtype=np.int32)
        self.key_skip = np.full(keys, -1, dtype=np.int16)  # index into self.kinds
        self.key_records = np.bincount(self.record_key, minlength=keys)
        self.kinds: list[str] = []
        self.skipped = SkipReport()
        self.merges: list[BucketMerge] = []

    def key_seed(self, key: int) -> int | None:
        return image_seed(self.seed, self.records[key].path) if self.settings.is_random else None

    def plan_all(self) -> None:
        chunk = 1 << 16  # a million keys as Python lists would cost more than the arrays they index
        for start in range(0, len(self.key_sizes), chunk):
            for key, (width, height) in enumerate(self.key_sizes[start : start + chunk].tolist(), start):
                self.store(key, plan_image(width, height, self.settings, self.key_seed(key)))

    def store(self, key: int, result: ImagePlan | Skip) -> None:
        if isinstance(result, Skip):
            self.store_skip_kind(np.array([key]), result.kind)
            return
        left, top = result.crop_box[:2]
        self.plans[key] = (*result.original_size, *result.resized_size, left, top, *result.target_size)

    def usable_keys(self) -> np.ndarray:
        return np.flatnonzero(self.key_skip < 0)

    def usable_targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(usable keys, distinct targets (n, 2), target row of each usable key)."""
        keys = self.usable_keys()
        targets, inverse = np.unique(self.plans[keys, 6:8].reshape(-1, 2), axis=0, return_inverse=True)
        return keys, targets, inverse.reshape(-1)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        keys, targets, inverse = self.usable_targets()
        sums = np.bincount(inverse, weights=self.key_records[keys], minlength=len(targets))
        return {(int(w), int(h)): int(n) for (w, h), n in zip(targets.tolist(), sums.tolist())}

    def keys_of(self, target: tuple[int, int]) -> np.ndarray:
        usable = self.key_skip < 0
        return np.flatnonzero(usable & (self.plans[:, 6] == target[0]) & (self.plans[:, 7] == target[1]))

    def settle_small_buckets(self, batch_size: int) -> None:
        while True:
            counts = self.bucket_counts()
            small = sorted((n, size) for size, n in counts.items() if n < batch_size)
            if not small:
                return
            count, source = small[0]
            others = [size for size in counts if size != source]
            if self.settings.small_bucket_policy == "merge" and self.merge(source, count, others):
                continue
            self.drop(source, count, batch_size, merged=self.settings.small_bucket_policy == "merge")

    def merge(self, source: tuple[int, int], count: int, others: list[tuple[int, int]]) -> bool:
        keys = self.keys_of(source)
        for target in sorted(others, key=lambda t: _bucket_distance(source, t)):
            replans = [self.replan(key, target) for key in keys.tolist()]
            if any(isinstance(p, Skip) for p in replans):
                continue
            for key, plan in zip(keys.tolist(), replans):
                self.store(key, plan)
            self.merges.append(BucketMerge(source, target, count))
            logger.info("dataset %r: bucket %dx%d (%d images) merged into %dx%d",
                        self.dataset_id, *source, count, *target)
            return True
        return False

    def replan(self, key: int, target: tuple[int, int]) -> ImagePlan | Skip:
        width, height = (int(v) for v in self.key_sizes[key])
        return plan_for_target(width, height, target, self.settings, self.key_seed(key))

    def drop(self, source: tuple[int, int], count: int, batch_size: int, merged: bool) -> None:
        keys = self.keys_of(source)
        why = f"bucket {source[0]}x{source[1]} has {count} image(s) < batch size {batch_size}"
        if merged:
            why += "; no other bucket could take them"
            if self.settings.prevent_upscaling:
                why += " without upscaling"
        records = np.flatnonzero(np.isin(self.record_key, keys))
        for record in records[: self.skipped.max_examples].tolist():
            self.skipped.add(SMALL_BUCKET, 0, f"{self.records[record].path}: {why}")
        self.skipped.add(SMALL_BUCKET, count)
        logger.warning("dataset %r: bucket dropped: %s", self.dataset_id, why)
        self.store_skip_kind(keys, SMALL_BUCKET)

    def store_skip_kind(self, keys: np.ndarray, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)
        self.key_skip[keys] = self.kinds.index(kind)

    def report_plan_skips(self) -> None:
        record_skip = self.key_skip[self.record_key]
        for code, kind in enumerate(self.kinds):
            if kind == SMALL_BUCKET:
                continue
            records = np.flatnonzero(record_skip == code)
            self.skipped.add(kind, int(records.shape[0]))
            for record in records[: self.skipped.max_examples].tolist():
                record_obj = self.records[record]
                skip = plan_image(record_obj.width, record_obj.height, self.settings, self.key_seed(record))
                reason = skip.reason if isinstance(skip, Skip) else kind
                self.skipped.add(kind, 0, f"{record_obj.path}: {reason}")

    def finish(self, batch_size: int) -> BucketAssignment:
        self.report_plan_skips()
        keys, targets, inverse = self.usable_targets()
        # buckets from the tallest to the widest, smaller areas first
        ranked = sorted(range(len(targets)), key=lambda i: (targets[i, 0] / targets[i, 1], targets[i].prod()))
        rank_of = np.empty(len(targets), dtype=np.int64)
        rank_of[ranked] = np.arange(len(targets))
        bucket_of_key = np.full(len(self.key_sizes), -1, dtype=np.int32)
        bucket_of_key[keys] = rank_of[inverse]
        buckets = tuple((int(targets[i, 0]), int(targets[i, 1])) for i in ranked)
        record_bucket = bucket_of_key[self.record_key]
        counts = np.bincount(record_bucket + 1, minlength=len(buckets) + 1)  # slot 0: excluded records
        order = np.argsort(record_bucket, kind="stable")[counts[0]:].astype(self.index_dtype)
        record_plan = np.where(record_bucket >= 0, self.record_key, self.record_key.dtype.type(-1))
        counts = counts[1:]
        return BucketAssignment(
            records=self.records,
            batch_size=batch_size,
            buckets=buckets,
            bucket_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            order=order,
            record_plan=record_plan,
            plan_table=self.plans,
            skipped=self.skipped,
            merges=tuple(self.merges),
            settings=self.settings,
            seed=self.seed,
        )


def _distinct_sizes(sizes: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(distinct (width, height) rows sorted, each record's row), a chunk at a time to spare memory."""
    chunk = 1 << 20
    codes = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(sizes), chunk):
        codes = [np.unique(np.concatenate([codes[0], _size_codes(sizes[start : start + chunk])]))]
    distinct = codes[0]
    record_key = np.empty(len(sizes), dtype=dtype)
    for start in range(0, len(sizes), chunk):
        record_key[start : start + chunk] = np.searchsorted(distinct, _size_codes(sizes[start : start + chunk]))
    return np.stack([distinct >> 32, distinct & 0xFFFFFFFF], axis=1), record_key


def _size_codes(sizes: np.ndarray) -> np.ndarray:
    return (sizes[:, 0].astype(np.int64) << 32) | sizes[:, 1].astype(np.int64)


def _record_sizes(records: Sequence[ImageRecord]) -> np.ndarray:
    """(n, 2) widths and heights; a columnar index view may hand them over as `sizes()`."""
    sizes = getattr(records, "sizes", None)
    if callable(sizes):
        return np.asarray(sizes()).reshape(len(records), 2)
    flat = np.fromiter((side for r in records for side in (r.width, r.height)), np.int64, count=2 * len(records))
    return flat.reshape(-1, 2)


def _bucket_distance(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, tuple[int, int]]:
    aspect = abs(math.log((target[0] / target[1]) / (source[0] / source[1])))
    area = abs(math.log((target[0] * target[1]) / (source[0] * source[1])))
    return (aspect, area, target)


def _no_usable_message(dataset_id: str, records: int, skipped: SkipReport, upstream: SkipReport | None) -> str:
    every = SkipReport()
    if upstream is not None:
        every.update(upstream)
    every.update(skipped)
    found = records + (upstream.total if upstream is not None else 0)
    if found == 0:
        return (f"dataset {dataset_id!r}: no usable image; no image files were found: check the dataset's "
                "location (instance_data_dir / aws_bucket_name and aws_data_prefix) and the files' extensions")
    lines = [f"dataset {dataset_id!r}: no usable image; {found} file(s) found, every one excluded:"]
    for kind, line in zip(sorted(every.counts, key=lambda k: (-every.counts[k], k)), every.lines()):
        hint = _HINTS.get(kind)
        lines.append(f"  - {line}" + (f" -> {hint}" if hint else ""))
    return "\n".join(lines)
