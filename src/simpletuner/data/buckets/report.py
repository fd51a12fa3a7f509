"""What an assignment found: the images left out by reason, merged buckets, and the assignment itself."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from simpletuner.data.buckets.plan import epoch_image_seed, redraw_crop
from simpletuner.data.buckets.settings import BucketSettings
from simpletuner.data.records import ImagePlan, ImageRecord

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
