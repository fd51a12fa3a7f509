"""Sampler and index memory at 10 million images (synthetic index).

    python benchmarks/sampler_memory.py [--images 10000000] [--batch-size 4] [--world-size 1] [--rank 0] [--record]

Builds two synthetic columnar indexes (`simpletuner.data.index.ImageIndex`: paths in one
blob, sizes and stats in numpy columns), 90% and 10% of `--images`, with sizes drawn
from 120 common photo sizes; assigns buckets (pixel_area 1024, alignment 64, centre
crops); builds a `MultiDatasetSampler` over both (the small one with repeats=1), draws
1,000 batches, saves its state and resumes a second sampler from it mid-epoch.

Reports the bytes held by the index columns, the bucket assignment and one epoch's
sampler plan, and the process's peak resident memory over its baseline after imports
(`ru_maxrss`, which includes every temporary). Target: < 1 GB for 10M images.
`benchmarks/data_pipeline.py` runs this script in a fresh process (`--json`) for its table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from simpletuner.data.buckets import BucketAssignment, BucketSettings, assign_buckets
from simpletuner.data.index import ImageIndex, PathTable
from simpletuner.data.records import ImageRecord
from simpletuner.data.sampler import MultiDatasetSampler, SamplerDataset

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def synthetic_paths(count: int, prefix: str, chunk: int = 1_000_000) -> PathTable:
    """`count` paths like 'prefix/0012/00123456.jpg' in one blob, built a chunk at a time."""
    blob = bytearray()
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        blob += b"".join(f"{prefix}/{i // 10_000:04d}/{i:08d}.jpg\0".encode() for i in range(start, stop))
    width = len(f"{prefix}/0000/00000000.jpg") + 1
    return PathTable(blob, np.arange(count + 1, dtype=np.int64) * width)  # type: ignore[arg-type]  (no copy)


def synthetic_index(count: int, prefix: str, seed: int) -> ImageIndex:
    rng = np.random.default_rng(seed)
    sides = np.array([640, 768, 800, 960, 1024, 1080, 1200, 1280, 1440, 1536, 1600, 1920, 2048, 2400, 3000,
                      3024, 3264, 3840, 4000, 4032, 4096, 4608, 5184, 6000], dtype=np.int32)
    pairs = rng.choice(len(sides), size=(120, 2))  # 120 common (width, height) sizes
    chosen = pairs[rng.integers(0, len(pairs), count)]
    return ImageIndex(
        location=f"/synthetic/{prefix}",
        paths=synthetic_paths(count, prefix),
        file_size=rng.integers(50_000, 5_000_000, count, dtype=np.int64),
        mtime=1.7e9 + rng.random(count) * 1e7,
        width=sides[chosen[:, 0]],
        height=sides[chosen[:, 1]],
        status=np.zeros(count, dtype=np.uint8),
    )


class IndexRecords(Sequence[ImageRecord]):
    """Every row of an ImageIndex as ImageRecords, made on demand; sizes in one array."""

    def __init__(self, index: ImageIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row):  # type: ignore[override]
        i = self.index
        return ImageRecord(i.paths[row], int(i.file_size[row]), float(i.mtime[row]), int(i.width[row]),
                           int(i.height[row]))

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self[row] for row in range(len(self)))

    def sizes(self) -> np.ndarray:
        return np.stack([self.index.width, self.index.height], axis=1)


def assignment_bytes(a: BucketAssignment) -> int:
    return a.order.nbytes + a.record_plan.nbytes + a.plan_table.nbytes + a.bucket_offsets.nbytes


def plan_bytes(sampler: MultiDatasetSampler) -> int:
    plan = sampler._plan  # noqa: SLF001  (measurement only)
    if plan is None:
        return 0
    arrays = [plan.step_dataset]
    for epoch in plan.datasets:
        arrays += [epoch.passes, epoch.batch_order.base if epoch.batch_order.base is not None else epoch.batch_order,
                   epoch.first_batch]
    return sum(array.nbytes for array in arrays)


def measure_sampler_memory(images: int, batch_size: int, world_size: int, rank: int = 0) -> dict[str, float]:
    """Run the pipeline from index to resumed sampler at `images` entries; figures by name."""
    gc.collect()
    baseline = rss_bytes()
    out: dict[str, float] = {"images": images, "batch_size": batch_size, "world_size": world_size, "rank": rank}
    big, small = images - images // 10, images // 10

    started = time.perf_counter()
    indexes = [synthetic_index(big, "main", 1), synthetic_index(small, "extra", 2)]
    out["index_build_s"] = time.perf_counter() - started
    out["index_mb"] = sum(index.nbytes() for index in indexes) / MB

    settings = BucketSettings(resolution=1024, resolution_type="pixel_area", alignment=64, crop=True,
                              crop_style="center", crop_aspect="preserve")
    started = time.perf_counter()
    assignments = [assign_buckets(IndexRecords(index), settings, batch_size, seed=0, dataset_id=index.location)
                   for index in indexes]
    out["assign_buckets_s"] = time.perf_counter() - started
    out["assignment_mb"] = sum(map(assignment_bytes, assignments)) / MB
    out["buckets"] = sum(len(a.buckets) for a in assignments)

    def make() -> MultiDatasetSampler:
        datasets = [SamplerDataset("main", assignments[0]), SamplerDataset("extra", assignments[1], repeats=1)]
        return MultiDatasetSampler(datasets, batch_size, seed=42, rank=rank, world_size=world_size)

    sampler = make()
    started = time.perf_counter()
    next(sampler)
    out["first_batch_s"] = time.perf_counter() - started
    out["steps_per_epoch"] = sampler.steps_in_epoch
    started = time.perf_counter()
    for _ in range(999):
        next(sampler)
    out["next_999_batches_ms"] = (time.perf_counter() - started) * 1e3
    out["sampler_plan_mb"] = plan_bytes(sampler) / MB
    state = json.dumps(sampler.state_dict())
    expected = [next(sampler) for _ in range(10)]
    del sampler
    resumed = make()
    started = time.perf_counter()
    resumed.load_state_dict(json.loads(state))
    assert [next(resumed) for _ in range(10)] == expected, "a resumed sampler continues exactly"
    out["resume_s"] = time.perf_counter() - started
    out["state_bytes"] = len(state)
    out["rss_delta_mb"] = (rss_bytes() - baseline) / MB
    out["peak_rss_delta_mb"] = (peak_rss_bytes() - baseline) / MB
    return out


ROWS = [  # (figure key, label, format)
    ("index_build_s", "synthetic index build", "{:.1f} s"),
    ("index_mb", "index columns (paths, sizes, stats)", "{:.0f} MB"),
    ("assign_buckets_s", "assign_buckets (both datasets)", "{:.1f} s"),
    ("assignment_mb", "bucket assignments", "{:.0f} MB"),
    ("buckets", "buckets", "{:.0f}"),
    ("first_batch_s", "first batch (plans the epoch)", "{:.1f} s"),
    ("steps_per_epoch", "steps per epoch (rank 0)", "{:,.0f}"),
    ("next_999_batches_ms", "next 999 batches", "{:.0f} ms"),
    ("sampler_plan_mb", "sampler epoch plan", "{:.0f} MB"),
    ("resume_s", "resume (load state + 10 batches)", "{:.1f} s"),
    ("state_bytes", "sampler state (JSON)", "{:.0f} bytes"),
    ("rss_delta_mb", "resident now - baseline", "{:.0f} MB"),
    ("peak_rss_delta_mb", "PEAK resident - baseline (target < 1,024 MB)", "{:.0f} MB"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0, help="the rank whose batches are drawn")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line instead")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("simpletuner").setLevel(logging.ERROR)  # the trimming warnings are expected here
    figures = measure_sampler_memory(args.images, args.batch_size, args.world_size, args.rank)
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = (f"| {label} | {fmt.format(figures[key])} |" for key, label, fmt in ROWS)
    table = ["| figure | value |", "|---|---|", *rows]
    print("\n".join(table))
    if args.record:
        header = (f"\n## Sampler and index memory, {args.images:,} images, batch size {args.batch_size}, "
                  f"{args.world_size} rank(s) ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                  f"- machine: {platform.node()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
                  f"numpy {np.__version__}\n"
                  f"- command: `python benchmarks/sampler_memory.py {' '.join(sys.argv[1:])}`\n\n")
        with RESULTS.open("a") as results:
            results.write(header + "\n".join(table) + "\n")
    return 0 if figures["peak_rss_delta_mb"] < 1024 else 1


if __name__ == "__main__":
    raise SystemExit(main())
