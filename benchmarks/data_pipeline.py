"""Data pipeline figures: index scan rate, unchanged rescan, sampler memory, cache reads and manifest open.

    python benchmarks/data_pipeline.py [--images 20000] [--cores 2] [--record]

Builds a synthetic dataset of `--images` JPEG and PNG files (mixed sizes, some with
EXIF orientation, in 100 folders) under a temporary folder, reads it once so it sits
in the page cache, then measures with the process pinned to `--cores` CPUs:

- scan: `simpletuner.data.index.scan_dataset` with no previous index (listing, header
  reads, truncation checks, saving the index). Target >= 5,000 images/s on 2 cores.
- rescan: the same call on the unchanged dataset (listing, reuse, no file opened).
  Target < 2 s for 20,000 images.

- sampler + index memory at 10 million entries (benchmarks/sampler_memory.py), < 1 GB.
- cache: random reads of SDXL-size latents from a warm store (>= 3,000 samples/s) and opening a
  1,000,000-entry manifest (< 2 s, < 300 MB), with benchmarks/cache_store.py's functions.

Each figure is one function returning a `Figure`; `main()` runs them all, prints a
table and, with --record, appends it with date, machine and command to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simpletuner.data.index import scan_dataset
from simpletuner.data.storage import DatasetStorage, WritableLocation

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str
    met: bool
    note: str = ""


# --------------------------------------------------------------------------- the synthetic dataset


def _templates(seed: int = 0) -> list[tuple[str, bytes]]:
    """A few dozen distinct encoded images (extension, bytes): header parsing is what costs, not pixels."""
    rng = np.random.default_rng(seed)
    sizes = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (640, 480), (2048, 1365), (512, 768)]
    templates = []
    for i, (width, height) in enumerate(sizes * 4):
        small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        buffer = io.BytesIO()
        if i % 2:
            image.save(buffer, "PNG", compress_level=1)
            templates.append((".png", buffer.getvalue()))
        else:
            exif = Image.Exif()
            exif[0x0112] = 6 if i % 8 == 0 else 1
            image.save(buffer, "JPEG", quality=85, exif=exif.tobytes())
            templates.append((".jpg", buffer.getvalue()))
    return templates


def build_dataset(root: Path, images: int) -> None:
    templates = _templates()
    for i in range(images):
        extension, data = templates[i % len(templates)]
        folder = root / f"part_{i % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"image_{i:07d}{extension}").write_bytes(data)


def warm_page_cache(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                total += len(handle.read())
    return total


# --------------------------------------------------------------------------- figures


def figure_scan_rate(root: Path, cache: Path, images: int, repeats: int = 3) -> Figure:
    """Median of `repeats` fresh scans (the machine may be shared: the spread is in the note)."""
    times = []
    for _ in range(repeats):
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        result = scan_dataset(DatasetStorage(str(root)), WritableLocation(str(cache)))
        times.append(time.perf_counter() - start)
        assert result.read == images and int(result.index.usable.sum()) == images, "every synthetic image is usable"
    seconds = sorted(times)[len(times) // 2]
    rate = images / seconds
    runs = ", ".join(f"{t:.2f}" for t in times)
    return Figure("index scan (fresh)", rate, "images/s", ">= 5,000 images/s", rate >= 5000,
                  f"{images} files; median of {repeats}: {seconds:.2f} s (runs {runs} s)")


def figure_rescan(root: Path, cache: Path, images: int) -> Figure:
    start = time.perf_counter()
    result = scan_dataset(DatasetStorage(str(root)), WritableLocation(str(cache)))
    seconds = time.perf_counter() - start
    assert result.read == 0 and result.reused == images, "an unchanged rescan opens no file"
    return Figure("index rescan (unchanged)", seconds, "s", "< 2 s", seconds < 2.0, f"{images} files, 0 opened")


def figure_sampler_memory(images: int) -> Figure:
    """Sampler and index memory at `images` entries (synthetic index), measured by
    benchmarks/sampler_memory.py in a fresh process so the scan's peak does not count."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent / "sampler_memory.py"
    run = subprocess.run([sys.executable, str(script), "--images", str(images), "--json"],
                         check=True, capture_output=True, text=True)
    f = json.loads(run.stdout.strip().splitlines()[-1])
    peak = f["peak_rss_delta_mb"]
    return Figure("sampler + index memory", peak, "MB peak RSS", "< 1,024 MB", peak < 1024,
                  f"{images:,} entries, batch size {f['batch_size']}: index {f['index_mb']:.0f} MB, buckets "
                  f"{f['assignment_mb']:.0f} MB, epoch plan {f['sampler_plan_mb']:.0f} MB; "
                  f"exact resume in {f['resume_s']:.1f} s")


def figure_cache_reads(workdir: Path, entries: int = 4000, seconds: float = 5.0) -> Figure:
    """Random reads of 4x128x128 bf16 mean+std entries from a warm store, one process."""
    from benchmarks.cache_store import build_read_store, reads_one_process

    root = str(workdir / "cache-reads")
    rate = reads_one_process(root, build_read_store(root, entries), seconds)
    return Figure("cache random reads (SDXL latents)", rate, "samples/s", ">= 3,000 samples/s", rate >= 3000,
                  f"{entries} entries of 4x128x128 bf16 mean+std, 1 process")


def figure_manifest_open(workdir: Path, entries: int = 1_000_000) -> Figure:
    """Open a store whose manifest lists `entries` entries (1,000 per segment), in a fresh process."""
    from benchmarks.cache_store import build_manifest, manifest_open

    root = str(workdir / "manifest")
    build_manifest(root, entries, 1000)
    count, seconds, delta, _, _ = manifest_open(root)
    return Figure("cache manifest open", seconds, "s", "< 2 s and < 300 MB", seconds < 2 and delta < 300,
                  f"{count:,} entries: +{delta:.0f} MB resident")


def run_figures(images: int, workdir: Path) -> list[Figure]:
    root, cache = workdir / "dataset", workdir / "cache"
    build_dataset(root, images)
    os.sync()  # no writeback of the fresh files competing with the measurement
    warm_page_cache(root)
    warm_page_cache(root)
    return [figure_scan_rate(root, cache, images), figure_rescan(root, cache, images)]


# --------------------------------------------------------------------------- report


def pin_cores(cores: int) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return f"{os.cpu_count()} cores (not pinned)"
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(available[:cores]))
    return f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores"


def table(figures: list[Figure]) -> str:
    lines = ["| figure | value | target | met | note |", "|---|---|---|---|---|"]
    for f in figures:
        value = f"{f.value:,.0f} {f.unit}" if f.value >= 100 else f"{f.value:.3f} {f.unit}"
        lines.append(f"| {f.name} | {value} | {f.target} | {'yes' if f.met else 'NO'} | {f.note} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}, {cpu}, Python {platform.python_version()}, Pillow {Image.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--cores", type=int, default=2, help="pin the process to this many CPUs")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the dataset (default: a temp dir)")
    parser.add_argument("--sampler-images", type=int, default=10_000_000,
                        help="entries of the sampler/index memory figure (0 skips it)")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="skip the cache figures")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cores = pin_cores(args.cores)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="st-data-bench-"))
    try:
        figures = run_figures(args.images, workdir)
        if args.sampler_images:
            figures.append(figure_sampler_memory(args.sampler_images))
        if args.cache:
            figures += [figure_cache_reads(workdir), figure_manifest_open(workdir)]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = table(figures)
    print(report)
    if args.record:
        command = "python benchmarks/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
        date = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
        header = (f"\n## Data pipeline: scan, sampler memory, cache ({date})\n\n"
                  f"- machine: {machine()}, {cores}; load average {load:.1f} when it started (shared machine)\n"
                  f"- command: `{command.strip()}`\n\n")
        with RESULTS.open("a") as results:
            results.write(header + report + "\n")
    return 0 if all(f.met for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
