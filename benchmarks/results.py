"""Appending a section of figures to benchmarks/RESULTS.md, with when, where and how it was measured."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(title: str, body: list[str], machine_note: str = "", command: str = "python") -> None:
    """Append `body` under `## <title> (<UTC time>)`, after the machine (plus `machine_note`) and the command line
    that made it (`command`, then this script and its arguments)."""
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}"
    script = f"benchmarks/{Path(sys.argv[0]).name}"
    lines = [f"\n## {title} ({stamp} UTC)\n",
             f"- machine: {platform.node()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}{machine_note}",
             f"- command: `{command} {script} {' '.join(sys.argv[1:])}`", "", *body]
    with RESULTS.open("a") as results:
        results.write("\n".join(lines) + "\n")
