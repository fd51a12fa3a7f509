"""The sampler's epoch planning at 1, 2 and 4 CPU processes (10M-entry synthetic index): per-rank memory
and time to the first batch.

    python benchmarks/sampler_ranks.py [--images 10000000] [--ranks 1 2 4] [--record]

For each process count N, starts N processes at once, each running `sampler_memory.py --json
--world-size N --rank r` (its own index, bucket assignment and epoch plan, as every rank of a run
builds them) and reports, per rank, the peak resident memory over its baseline, the epoch plan's
bytes, and the time from start to its first batch (index build + bucket assignment + planning).
The goal is flat per-rank memory as ranks grow. The processes share this machine's CPUs, so with
more processes than cores the times include waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_ranks(world_size: int, images: int, batch_size: int) -> list[dict[str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(HERE / "sampler_memory.py"), "--json", "--images", str(images),
                                   "--batch-size", str(batch_size), "--world-size", str(world_size),
                                   "--rank", str(rank)], stdout=subprocess.PIPE, text=True, env=env)
                 for rank in range(world_size)]
    figures = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode not in (0, 1):  # 1: over the memory target, still measured
            raise SystemExit(f"sampler_memory.py failed with exit {process.returncode}")
        figures.append(json.loads(out.strip().splitlines()[-1]))
    return figures


def rows(world_size: int, figures: list[dict[str, float]]) -> list[str]:
    lines = []
    for f in figures:
        to_first = f["index_build_s"] + f["assign_buckets_s"] + f["first_batch_s"]
        lines.append(f"| {world_size} | {int(f['rank'])} | {f['peak_rss_delta_mb']:.0f} MB | {f['sampler_plan_mb']:.0f} MB "
                     f"| {f['first_batch_s']:.2f} s | {to_first:.1f} s | {int(f['steps_per_epoch']):,} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    table = ["| processes | rank | peak resident - baseline | epoch plan | planning (first batch) "
             "| start to first batch | steps per epoch |", "|---|---|---|---|---|---|---|"]
    for world_size in args.ranks:
        table += rows(world_size, run_ranks(world_size, args.images, args.batch_size))
        print("\n".join(table), flush=True)
    if args.record:
        sys.path.insert(0, str(HERE.parent))
        from benchmarks.results import record

        record(f"Sampler epoch planning per rank, {args.images:,} images, batch size {args.batch_size}, "
               f"{'/'.join(map(str, args.ranks))} processes", table,
               "; the processes of a row run at once and share the CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
