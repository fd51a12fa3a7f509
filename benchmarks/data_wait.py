"""Data wait of `simpletuner train` on CPU: the share of step time the loop spends waiting for batches.

    python benchmarks/data_wait.py [--steps 60] [--images 64] [--batch 4] [--record]

Builds the tiny SD 1.x model (simpletuner.testing.tiny) and a procedural dataset in a
temporary folder, then trains it twice through `simpletuner.train.trainer.train`, the
function `simpletuner train` runs: with dataloader_prefetch on (the default) and off.
Each run's logging windows report `data_wait_seconds` (time the loop blocked on the next
micro-batch) and samples/s; the first window (warm-up) is left out. Target with
prefetch on: data wait < 5% of step time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpletuner.train.events import NoEvents

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TARGET = 0.05


class Windows(NoEvents):
    """Collects each logging window's figures (what `simpletuner train` shows on its progress bar)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_progress(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})


@dataclass
class Row:
    prefetch: bool
    step_seconds: float
    wait_seconds: float  # per step

    @property
    def share(self) -> float:
        return self.wait_seconds / self.step_seconds


def _config(root: Path, model: Path, dataset: Path, args: argparse.Namespace, prefetch: bool) -> Path:
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "instance_data_dir": str(dataset), "caption_strategy": "textfile", "resolution": 32,
         "resolution_type": "pixel_area"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]))
    config = {"model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": str(model),
              "output_dir": str(root / f"output-{prefetch}"), "cache_dir": str(root / "cache"),
              "data_backend_config": str(root / "multidatabackend.json"), "resolution": 32, "mixed_precision": "no",
              "base_model_default_dtype": "fp32", "vae_dtype": "fp32", "lora_rank": 4, "learning_rate": 1e-4,
              "lr_warmup_steps": 0, "train_batch_size": args.batch, "max_train_steps": args.steps,
              "checkpointing_steps": args.steps * 10, "logging_steps": args.window, "disable_validation": True,
              "report_to": "none", "seed": 7, "dataloader_prefetch": prefetch}
    path = root / f"config-{prefetch}.json"
    path.write_text(json.dumps(config))
    return path


def measure(root: Path, model: Path, dataset: Path, args: argparse.Namespace, prefetch: bool) -> Row:
    """Train once; step time and data wait per step over every logging window after the first."""
    from simpletuner.config.load import load_settings
    from simpletuner.train.trainer import train

    events = Windows()
    train(load_settings(str(_config(root, model, dataset, args, prefetch)), []), events)
    windows = events.rows[1:]
    seconds = sum(args.window * args.batch / row["samples_per_second"] for row in windows)
    wait = sum(row["data_wait_seconds"] for row in windows)
    steps = args.window * len(windows)
    return Row(prefetch, seconds / steps, wait / steps)


def table(rows: list[Row]) -> str:
    lines = ["| dataloader_prefetch | step (ms) | data wait (ms/step) | wait share | target < 5% |",
             "|---|---|---|---|---|"]
    for row in rows:
        met = "yes" if row.share < TARGET else "no"
        lines.append(f"| {'on' if row.prefetch else 'off'} | {row.step_seconds * 1e3:.1f} | "
                     f"{row.wait_seconds * 1e3:.3f} | {row.share * 100:.2f}% | {met if row.prefetch else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10, help="logging_steps: steps per measured window")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    from simpletuner.demo.dataset import write_dataset
    from simpletuner.testing.tiny import build

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build("sd1x", root / "model")
        dataset = write_dataset(root / "dataset", count=args.images)
        rows = [measure(root, model, dataset, args, prefetch) for prefetch in (True, False)]
    text = table(rows)
    print(text)
    if args.record:
        command = "python benchmarks/data_wait.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write(f"\n## Data wait of `simpletuner train` on CPU ({dt.date.today().isoformat()})\n\n"
                         f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                         f"{_threads()}. Command: `{command.strip()}`. Tiny SD 1.x LoRA at 32 px, batch {args.batch}, "
                         f"{args.steps} steps, the first window of {args.window} left out.\n\n{text}\n")
    return 0


def _threads() -> Any:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
