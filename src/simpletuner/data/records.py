"""Plain records passed between the stages of the data road.

storage/index produce `ImageRecord`s, buckets turn each into an `ImagePlan`, the
caches key their entries by both, and the sampler yields `SampleRef`s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One usable image as the index knows it. Sizes are after EXIF orientation."""

    path: str  # relative to the dataset root, '/'-separated
    file_size: int  # bytes
    mtime: float  # seconds since the epoch (as the storage reports it)
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """How one image becomes a training sample: resize, then crop to the target size.

    `crop_box` is (left, top, right, bottom) in the resized image; its size equals
    `target_size`. SDXL's time ids are (original_size, crop top-left, target_size).
    """

    original_size: tuple[int, int]  # (width, height)
    resized_size: tuple[int, int]  # (width, height) after resizing
    crop_box: tuple[int, int, int, int]
    target_size: tuple[int, int]  # (width, height) == the bucket

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left), the order SDXL's time ids use."""
        return (self.crop_box[1], self.crop_box[0])


@dataclass(frozen=True, slots=True)
class SampleRef:
    """One sample the sampler hands out: which dataset, which image, which bucket."""

    dataset_id: str
    path: str
    bucket: tuple[int, int]  # target (width, height)
    record: int = -1  # position in the dataset's index (BucketAssignment.plan(record) gives its plan)
    epoch: int = 0  # the sampler's epoch that handed it out
