"""A loss curve as a small PNG, drawn with Pillow alone (matplotlib is not a dependency).

    write_loss_plot(output_dir / "metrics.jsonl", output_dir / "loss.png")

Grey dots: the loss of each step; blue line: its moving average over a tenth of the run;
skipped (non-finite) steps are left out. Axes carry the step and loss ranges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 40


def read_losses(metrics: Path) -> list[tuple[int, float]]:
    """(step, loss) of every finite row of a metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows
            if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])]


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def write_loss_plot(metrics: Path, target: Path, title: str = "training loss") -> Path | None:
    """Draw the loss curve of `metrics` into `target`; None when there is nothing to draw."""
    points = read_losses(metrics) if metrics.is_file() else []
    if not points:
        return None
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    low, high = min(losses), max(losses)
    high = high if high > low else low + 1.0
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = _LEFT + (step - first) / (last - first) * (WIDTH - _LEFT - _RIGHT)
        y = HEIGHT - _BOTTOM - (loss - low) / (high - low) * (HEIGHT - _TOP - _BOTTOM)
        return x, y

    draw.rectangle([_LEFT, _TOP, WIDTH - _RIGHT, HEIGHT - _BOTTOM], outline=(160, 160, 160))
    for step, loss in points:
        x, y = xy(step, loss)
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(170, 170, 170))
    smooth = moving_average(losses, max(1, len(losses) // 10))
    draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    draw.text((_LEFT, 8), f"{title} (grey: each step; blue: moving average)", fill="black", font=font)
    draw.text((4, _TOP), f"{high:.4g}", fill="black", font=font)
    draw.text((4, HEIGHT - _BOTTOM - 10), f"{low:.4g}", fill="black", font=font)
    draw.text((_LEFT, HEIGHT - _BOTTOM + 6), f"step {first}", fill="black", font=font)
    draw.text((WIDTH - _RIGHT - 70, HEIGHT - _BOTTOM + 6), f"step {steps[-1]}", fill="black", font=font)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG", optimize=True)
    return target
