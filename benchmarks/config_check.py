"""Time `simpletuner config check` on a configuration with millions of unknown keys (issue 12's probe).

    python benchmarks/config_check.py [--keys 2500000] [--runs 3] [--src DIR] [--record]

Writes `{"key_000001": 1, ...}` (as json.dumps writes it) to a temporary config.json, then runs the real CLI in
a new process `--runs` times (`python -m simpletuner config check FILE`, the sources of `--src`, this
checkout's by default) and prints the wall time and the CPU time (user + system) of each run, and their
minimum and median. The check must fail with exit 2 (the keys are unknown); any other exit code stops it.
The load average is printed beside them: on a shared machine wall time grows with it, CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "src"


def write_config(path: Path, keys: int) -> int:
    """The probe's file: `keys` unknown keys; returns its size in bytes."""
    with path.open("w") as file:
        file.write("{" + ", ".join(f'"key_{i:06d}": 1' for i in range(1, keys + 1)) + "}")
    return path.stat().st_size


def time_check(config: Path, sources: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `config check` in its own process."""
    env = {**os.environ, "PYTHONPATH": str(sources)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "simpletuner", "config", "check", str(config)],
                            capture_output=True, text=True, env=env, cwd=config.parent)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 2 or "more unknown options" not in result.stderr:
        raise SystemExit(f"config check exited {result.returncode}, not 2 with the unknown keys counted:\n"
                         f"{result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2_500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", type=Path, default=SOURCES, help="the sources to time (a src folder)")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.json"
        size = write_config(config, args.keys)
        runs = []
        for _ in range(args.runs):
            runs.append(time_check(config, args.src.resolve()))
            print(f"wall {runs[-1][0]:.2f} s, CPU {runs[-1][1]:.2f} s, load average {os.getloadavg()[0]:.1f}")
    walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
    lines = [f"- file: {args.keys:,} unknown keys, {size / 1e6:.0f} MB of JSON",
             f"- wall: min {min(walls):.2f} s, median {statistics.median(walls):.2f} s ({args.runs} runs)",
             f"- CPU (user + system): min {min(cpus):.2f} s, median {statistics.median(cpus):.2f} s",
             f"- load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)"]
    print("\n".join(lines))
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.results import record

        record(f"config check, {args.keys:,} unknown keys", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
