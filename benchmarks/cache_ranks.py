"""Cache-build rate at 1, 2 and 4 CPU processes: `cache_latents` split over ranks into one shared store.

    python benchmarks/cache_ranks.py [--images 48] [--size 128] [--ranks 1 2 4] [--record]

For each process count N, starts `torchrun --standalone --nproc_per_node N` on this script (gloo, one torch
thread per process). Every process builds the SDXL VAE from its published configuration (random weights, fp32),
takes its part of `--images` PNGs (the job splits keys by hash over the ranks) and encodes it into one local
store, as `simpletuner cache` does on a shared filesystem. Reported per rank: entries encoded, seconds from
the common start to the end of the job (which ends at a barrier), and peak resident memory over the
process's resident memory before the job (the peak is reset there: /proc/self/clear_refs); per row, the rate: images / seconds. The processes share this
machine's CPUs: with more processes than free cores the rate stops growing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the peak resident memory (VmHWM) again from the current one (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def worker(folder: Path, out: Path) -> None:
    """One rank (torchrun sets RANK and WORLD_SIZE): encode this rank's part into folder/store."""
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.cache_encode import SDXL_VAE, _side
    from simpletuner.cache.keys import EncoderIdentity
    from simpletuner.cache.latents import cache_latents, latent_entry, latent_items
    from simpletuner.cache.store import TensorStore
    from simpletuner.data.records import ImagePlan, ImageRecord

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE).eval()
    paths = sorted((folder / "images").glob("*.png"))
    size = _side(paths[0])
    plan = ImagePlan((size, size), (size, size), (0, 0, size, size), (size, size))
    records = [ImageRecord(p.name, p.stat().st_size, p.stat().st_mtime, size, size) for p in paths]
    items = latent_items(str(folder / "images"), records, [plan] * len(records),
                         EncoderIdentity("random-sdxl", "vae", "float32"))

    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return latent_entry(vae.encode(pixels).latent_dist)

    encode(torch.zeros(4, 3, size, size))  # warm-up, at the job's batch size
    store = TensorStore(str(folder / "store"))
    before = rss_bytes()
    reset_peak()
    dist.barrier()
    started = time.perf_counter()
    summary = cache_latents(items, store, encode, batch_size=4, progress=False)  # ends at a barrier
    seconds = time.perf_counter() - started
    peak = peak_bytes()
    store.close()
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "encoded": summary.encoded, "seconds": seconds,
                                                      "peak_over_start_mb": max(0, peak - before) / MB}))
    dist.destroy_process_group()


def run_ranks(world_size: int, folder: Path) -> list[dict[str, float]]:
    out = folder / f"out-{world_size}"
    out.mkdir()
    shutil.rmtree(folder / "store", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               str(Path(__file__).resolve()), "--worker", str(folder), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{world_size} processes failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def rows(world_size: int, images: int, figures: list[dict[str, float]]) -> list[str]:
    wall = max(f["seconds"] for f in figures)
    return [f"| {world_size} | {int(f['rank'])} | {int(f['encoded'])} | {f['seconds']:.1f} s | "
            f"{f['peak_over_start_mb']:.0f} MB | {images / wall:.2f} images/s |" for f in figures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.cache_encode import _images

    table = ["| processes | rank | entries encoded | seconds (start to end of job) | peak resident over start "
             "| rate (all ranks) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        _images(folder / "images", args.images, args.size)
        for world_size in args.ranks:
            table += rows(world_size, args.images, run_ranks(world_size, folder))
            print("\n".join(table), flush=True)
    if args.record:
        from benchmarks.results import record

        record(f"Cache-build rate per process count, {args.images} PNGs of {args.size} px, SDXL VAE (published "
               "configuration, random weights, fp32), batch 4", table,
               f", one torch thread per process; load average {os.getloadavg()[0]:.1f} at the end (other sessions' "
               "work included)", command="OMP_NUM_THREADS=1 PYTHONPATH=src python")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
