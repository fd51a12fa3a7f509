"""Tensor-store figures: random reads, manifest open time and memory, store overhead next to a VAE.

    python benchmarks/cache_store.py [--entries 4000] [--manifest-entries 1000000] [--record] [--reads-only]

1. Random reads: a warm store of `--entries` SDXL-size VAE entries (mean and std, each
   4x128x128 bf16: 256 KiB per entry) read in random order by `store.get`: each entry once
   by a fresh reader (every read computes the entry's CRC-32, as a first epoch does), then
   repeatedly in one process, in two processes at once (2 cores), and through a torch
   DataLoader with 2 worker processes and batches of 16 (includes the hand-over to the main
   process). Target: >= 3,000 samples/s.
2. Manifest: 1,000,000 entries as 1,000 writer segments (as 1,000 committed shards
   leave them) and as one compacted segment; opened in a fresh process. Reports the
   open time and the process's peak resident memory (VmHWM) over its resident memory
   before the open (numpy and the store module already imported). Target: < 2 s and < 300 MB.
3. Overhead: the put path (encode entry, write, checksum, commit) per entry, next to the
   encoder's own time per image: the full-size SDXL VAE encoder architecture (random
   weights, published config) at 256x256 on this CPU, where the put path handles that
   size's entry (mean and std 4x32x32). Both scale with the pixel count. Also a whole
   `cache_latents` job: wall time minus time inside the encoder, over the encoder time
   (includes image decoding on loader threads). Target: < 5%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simpletuner.cache.format import MANIFEST, Segment
from simpletuner.cache.store import TensorStore

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = (
    "Reads copy each tensor out of the memory-mapped shard (fresh, writable tensors). The DataLoader row\n"
    "is bound by handing 4 MiB batches to the main process through shared memory, not by the store: read\n"
    "in the main process, or draw `sample_latent` in the workers. The encoder ratio is on CPU; on a GPU the\n"
    "encode is faster while the put path (last row: per 1024x1024 entry, CPU-bound) stays the same.\n"
)


def key(i: int) -> str:
    """Keys spread over the key space, like real hashes."""
    return f"{(i * 0x9E3779B97F4A7C15F39CC0605CEDC835 + 12345) % (1 << 128):032x}"


# ----------------------------------------------------------------------------- 1. random reads


def build_read_store(root: str, entries: int) -> list[str]:
    store = TensorStore(root)
    mean = torch.randn(4, 128, 128).to(torch.bfloat16)
    keys = [key(i) for i in range(entries)]
    with store.writer("bench") as writer:
        for k in keys:
            writer.put(k, {"mean": mean, "std": mean.abs()})
    return keys


def first_reads(root: str, keys: list[str]) -> float:
    """Every entry read once, in random order, by a fresh reader: each read computes the entry's CRC-32
    (later reads of an entry by the same reader skip it). Shards are in the page cache."""
    store = TensorStore(root)
    order = keys[:]
    random.Random(1).shuffle(order)
    start = time.perf_counter()
    for k in order:
        store.get(k)
    return len(order) / (time.perf_counter() - start)


def reads_one_process(root: str, keys: list[str], seconds: float) -> float:
    store = TensorStore(root)
    order = keys[:]
    for k in order:  # warm: page cache and mmaps
        store.get(k)
    random.Random(0).shuffle(order)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        store.get(order[n % len(order)])
        n += 1
    return n / (time.perf_counter() - start)


class _Reads(torch.utils.data.Dataset):
    def __init__(self, root: str, keys: list[str]):
        self.root, self.keys, self.store = root, keys, None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        if self.store is None:
            self.store = TensorStore(self.root)  # one reader per worker process
        return self.store.get(self.keys[i])


def _read_worker(root: str, keys: list[str], seconds: float, queue) -> None:
    queue.put(reads_one_process(root, keys, seconds))


def reads_two_processes(root: str, keys: list[str], seconds: float) -> float:
    """Two reader processes at once (one per core): their summed rate."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_read_worker, args=(root, keys, seconds, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    rates = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def reads_two_workers(root: str, keys: list[str], passes: int = 2, batch: int = 16) -> float:
    """What training sees: a DataLoader with 2 worker processes handing batches to the main process."""
    loader = torch.utils.data.DataLoader(_Reads(root, keys), batch_size=batch, shuffle=True, num_workers=2,
                                         persistent_workers=True, prefetch_factor=8)
    for _ in loader:  # warm-up pass (workers start, shards mapped)
        pass
    n, start = 0, time.perf_counter()
    for _ in range(passes):
        for batch_ in loader:
            n += len(batch_["mean"])
    return n / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- 2. manifest


def build_manifest(root: str, entries: int, per_segment: int) -> None:
    os.makedirs(os.path.join(root, MANIFEST), exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, entries, per_segment):
        n = min(per_segment, entries - s)
        seg = Segment(f"w-{s // per_segment:06d}.seg", [f"w-{s // per_segment:06d}.shard"], "w", [],
                      rng.integers(0, 256, (n, 16), dtype=np.uint8), np.zeros(n, np.uint32),
                      np.arange(n, dtype=np.uint64) * 262144, np.full(n, 262144, np.uint64),
                      rng.integers(0, 2**32, n, dtype=np.uint32))
        with open(os.path.join(root, MANIFEST, seg.name), "wb") as f:
            f.write(seg.to_bytes())


OPEN_PROBE = """
import sys, time
import numpy as np
from simpletuner.cache.store import TensorStore

def mb(field):  # VmHWM: this process's peak resident memory; VmRSS: now (per process, reset at exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024

base = mb("VmRSS")
start = time.perf_counter()
store = TensorStore(sys.argv[1])
seconds = time.perf_counter() - start
peak = mb("VmHWM")
keys = [store.manifest.key_at(i) for i in np.random.default_rng(0).integers(0, len(store), 100000)]
t = time.perf_counter()
assert all(k in store for k in keys)
lookups = len(keys) / (time.perf_counter() - t)
print(len(store), seconds, peak - base, peak, lookups)
"""


def manifest_open(root: str) -> tuple[int, float, float, float, float]:
    out = subprocess.run([sys.executable, "-c", OPEN_PROBE, root], capture_output=True, text=True, check=True)
    n, seconds, delta, peak, lookups = out.stdout.split()
    return int(n), float(seconds), float(delta), float(peak), float(lookups)


def compact(root: str, target: str) -> None:
    store = TensorStore(root)
    os.makedirs(os.path.join(target, MANIFEST), exist_ok=True)
    seg = store.manifest.segment("compact-0.seg", "bench", [])
    with open(os.path.join(target, MANIFEST, seg.name), "wb") as f:
        f.write(seg.to_bytes())


# ----------------------------------------------------------------------------- 3. overhead


def sdxl_vae_encoder() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(  # stabilityai/sdxl-vae config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
    ).eval()


def put_path_ms(root: str, entry: dict, count: int, repeats: int = 3) -> float:
    """Milliseconds per entry of `writer.put` plus the commit, best of `repeats` runs."""
    best = float("inf")
    for r in range(repeats):
        store = TensorStore(f"{root}-{r}")
        start = time.perf_counter()
        with store.writer("put", shard_entries=256) as writer:
            for i in range(count):
                writer.put(key(10**9 + i), entry)
        best = min(best, (time.perf_counter() - start) / count * 1000)
    return best


def overhead(root: str, side: int, images: int) -> dict:
    from PIL import Image

    from simpletuner.cache.keys import EncoderIdentity
    from simpletuner.cache.latents import cache_latents, latent_entry, latent_items
    from simpletuner.data.records import ImagePlan, ImageRecord

    vae = sdxl_vae_encoder()
    spent = []

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> dict:
        start = time.perf_counter()
        dist = vae.encode(pixels).latent_dist
        out = {name: t.to(torch.bfloat16) for name, t in latent_entry(dist).items()}
        spent.append(time.perf_counter() - start)
        return out

    pixels = torch.rand(1, 3, side, side) * 2 - 1
    encode(pixels)  # warm-up
    spent.clear()
    for _ in range(3):
        encode(pixels)
    encode_ms = min(spent) * 1000
    sample = encode(pixels)
    entry = {name: t[0] for name, t in sample.items()}
    put_ms = put_path_ms(os.path.join(root, "put"), entry, 200)

    folder = Path(root) / "images"
    folder.mkdir()
    records, plans = [], []
    for i in range(images):
        path = folder / f"{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        stat = path.stat()
        records.append(ImageRecord(path.name, stat.st_size, stat.st_mtime, side, side))
        plans.append(ImagePlan((side, side), (side, side), (0, 0, side, side), (side, side)))
    items = latent_items(str(folder), records, plans, EncoderIdentity("sdxl-vae", "vae", "bfloat16"))
    spent.clear()
    start = time.perf_counter()
    cache_latents(items, TensorStore(os.path.join(root, "job")), encode, batch_size=1, progress=False)
    wall = time.perf_counter() - start
    return {"encode_ms": encode_ms, "put_ms": put_ms, "entry_kib": sum(t.numel() * t.element_size()
            for t in entry.values()) / 1024, "job_wall": wall, "job_encode": sum(spent), "images": images}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=4000, help="entries in the read benchmark's store")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of the one-process read run")
    p.add_argument("--manifest-entries", type=int, default=1_000_000)
    p.add_argument("--overhead-side", type=int, default=256, help="image side for the VAE overhead run")
    p.add_argument("--overhead-images", type=int, default=8)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    p.add_argument("--reads-only", action="store_true", help="only part 1, the random reads")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(2)
    work = args.workdir or tempfile.mkdtemp(prefix="cache-bench-")
    rows = []
    try:
        root = os.path.join(work, "reads")
        keys = build_read_store(root, args.entries)
        first = first_reads(root, keys)
        one = reads_one_process(root, keys, args.seconds)
        both = reads_two_processes(root, keys, args.seconds)
        loader = reads_two_workers(root, keys)
        rows.append(("first reads, 1 process (store.get, checksum each)", f"{first:,.0f} samples/s", ">= 3,000"))
        rows.append(("random reads, 1 process (store.get)", f"{one:,.0f} samples/s", ">= 3,000"))
        rows.append(("random reads, 2 processes at once (summed)", f"{both:,.0f} samples/s", ">= 3,000"))
        rows.append(("random reads, DataLoader 2 workers, batches of 16", f"{loader:,.0f} samples/s", ""))
        shutil.rmtree(root)
        if not args.reads_only:
            rows += manifest_and_overhead(work, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(rows, args, load_before)


def manifest_and_overhead(work: str, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Parts 2 and 3: manifest open time and memory, and the put path next to a VAE encoder."""
    rows = []
    root = os.path.join(work, "manifest")
    build_manifest(root, args.manifest_entries, 1000)
    n, seconds, delta, peak, lookups = manifest_open(root)
    rows.append((f"manifest open, {n:,} entries in {n // 1000} segments", f"{seconds:.2f} s, +{delta:.0f} MB "
                 f"(peak RSS {peak:.0f} MB)", "< 2 s, < 300 MB"))
    compact(root, os.path.join(work, "compact"))
    n, seconds, delta, peak, lookups = manifest_open(os.path.join(work, "compact"))
    rows.append((f"manifest open, {n:,} entries, 1 compacted segment", f"{seconds:.2f} s, +{delta:.0f} MB "
                 f"(peak RSS {peak:.0f} MB)", "< 2 s, < 300 MB"))
    rows.append(("key lookups in a 1,000,000-entry manifest", f"{lookups:,.0f} /s", ""))

    o = overhead(os.path.join(work, "overhead"), args.overhead_side, args.overhead_images)
    rows.append((f"SDXL VAE encoder, {args.overhead_side}x{args.overhead_side}, CPU, per image",
                 f"{o['encode_ms']:.0f} ms", ""))
    rows.append((f"put path per entry ({o['entry_kib']:.0f} KiB: mean+std bf16)",
                 f"{o['put_ms']:.3f} ms = {o['put_ms'] / o['encode_ms']:.3%} of encode", "< 5%"))
    job_overhead = (o["job_wall"] - o["job_encode"]) / o["job_encode"]
    rows.append((f"cache_latents job, {o['images']} JPEGs: wall over encoder time", f"+{job_overhead:.2%}",
                 "< 5%"))
    big = put_path_ms(os.path.join(work, "big"), {"mean": torch.zeros(4, 128, 128, dtype=torch.bfloat16),
                                                  "std": torch.zeros(4, 128, 128, dtype=torch.bfloat16)}, 200)
    rows.append(("put path per SDXL 1024x1024 entry (256 KiB)", f"{big:.3f} ms", ""))
    return rows


def report(rows: list[tuple[str, str, str]], args: argparse.Namespace, load_before: float) -> None:
    width = max(len(r[0]) for r in rows)
    table = [f"| {'measure'.ljust(width)} | result | target |", f"|{'-' * (width + 2)}|---|---|"]
    table += [f"| {a.ljust(width)} | {b} | {c} |" for a, b, c in rows]
    print("\n".join(table))
    if args.record:
        machine = (f"{platform.node()}: {os.cpu_count()} CPU cores visible, {platform.machine()}, load average "
                   f"{load_before:.1f} at start and {os.getloadavg()[0]:.1f} at the end (shared machine)")
        with open(RESULTS, "a") as f:
            f.write(f"\n## Cache store ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                    f"Machine: {machine}; torch {torch.__version__}, numpy {np.__version__}, Python "
                    f"{platform.python_version()}.\nCommand: `python benchmarks/cache_store.py "
                    f"{' '.join(sys.argv[1:])}`\n\n" + "\n".join(table) + "\n\n" + NOTES)


if __name__ == "__main__":
    main()
