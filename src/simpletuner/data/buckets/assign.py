"""Assigning a whole index to buckets: plans grouped by size, small buckets merged or dropped."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from simpletuner.data.buckets.plan import image_seed, plan_for_target, plan_image
from simpletuner.data.buckets.report import _PLAN_COLUMNS, BucketAssignment, BucketMerge, SkipReport
from simpletuner.data.buckets.settings import _HINTS, SMALL_BUCKET, BucketSettings, Skip
from simpletuner.data.records import ImagePlan, ImageRecord
from simpletuner.errors import ConfigError, DataError
from simpletuner.log import get_logger

logger = get_logger("simpletuner.data.buckets")  # the name its messages always had

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
