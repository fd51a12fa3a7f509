"""Experiment trackers: TensorBoard (the default, when installed), Weights & Biases, or none.

Built on accelerate's tracker classes. Only the main process logs; the others get a tracker
that does nothing. Weights & Biases honours its own environment (WANDB_MODE=offline, WANDB_DIR,
WANDB_API_KEY).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger

logger = get_logger(__name__)


def choose_backend(report_to: str) -> str | None:
    """The tracker to use for `report_to`, or None; a UserError when wandb is asked for but missing."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            logger.warning("report_to=tensorboard but tensorboard is not installed (`pip install tensorboard`): "
                           "no metrics will be recorded")
            return None
        return "tensorboard"
    if report_to == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to='wandb' needs the 'wandb' package, which is not installed: "
                              "`pip install wandb`, or set report_to to 'tensorboard' or 'none'")
        return "wandb"
    raise ConfigError(f"report_to={report_to!r} is unknown; accepted: tensorboard, wandb, none")


def training_scalars(
    *,
    loss: float,
    learning_rate: float,
    grad_norm: float | None = None,
    samples_per_second: float | None = None,
    data_wait_seconds: float | None = None,
) -> dict[str, float]:
    """The per-step metrics under their canonical names (None values are left out)."""
    values = {"train/loss": loss, "train/learning_rate": learning_rate, "train/grad_norm": grad_norm,
              "train/samples_per_second": samples_per_second, "train/data_wait_seconds": data_wait_seconds}
    return {name: float(value) for name, value in values.items() if value is not None}


class Tracker:
    """Logs scalars and images to one accelerate tracker, or nowhere."""

    def __init__(self, backend: Any | None = None) -> None:
        self.backend = backend

    @property
    def name(self) -> str | None:
        return None if self.backend is None else self.backend.name

    def log_scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log numbers (floats, ints or one-element tensors) at `step`."""
        if self.backend is not None:
            self.backend.log({k: float(v) for k, v in values.items()}, step=step)

    def log_images(self, images: Mapping[str, Sequence[Image.Image]], step: int) -> None:
        """Log lists of images (e.g. validation samples, any sizes) at `step`."""
        if self.backend is None:
            return
        if self.backend.name == "tensorboard":
            arrays = {f"{key}/{i}": np.asarray(image.convert("RGB"))[None]
                      for key, group in images.items() for i, image in enumerate(group)}
            self.backend.log_images(arrays, step=step, dataformats="NHWC")
        else:
            self.backend.log_images({key: list(group) for key, group in images.items()}, step=step)

    def finish(self) -> None:
        if self.backend is not None:
            self.backend.finish()
            self.backend = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def open_tracker(cfg: Any, *, is_main_process: bool = True, run_config: Mapping[str, Any] | None = None,
                 resumed_at: int | None = None) -> Tracker:
    """Start the tracker `cfg.report_to` names, logging under output_dir/logging_dir.

    `run_config` (JSON values, e.g. the configuration) is recorded with the run. `resumed_at`: the
    step this run starts from (a checkpoint's, or 0); TensorBoard then purges what an interrupted or
    earlier run logged in the same folder after it (purge_step). Weights & Biases cannot rewrite its
    history: it ignores steps already logged.
    """
    backend_name = choose_backend(cfg.report_to)
    if backend_name is None or not is_main_process:
        return Tracker()
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    PartialState()  # accelerate's trackers log through its logger, which needs the (shared) state

    logging_dir = Path(cfg.output_dir) / cfg.logging_dir
    logging_dir.mkdir(parents=True, exist_ok=True)
    run_name = cfg.tracker_run_name or cfg.tracker_project_name
    if backend_name == "tensorboard":
        backend = TensorBoardTracker(run_name, logging_dir, purge_step=(resumed_at or 0) + 1)
        backend.start()
        if run_config:
            backend.writer.add_text("config", f"```\n{json.dumps(dict(run_config), indent=2, default=str)}\n```")
    else:
        backend = WandBTracker(cfg.tracker_project_name, name=cfg.tracker_run_name, dir=str(logging_dir),
                               config=dict(run_config or {}))
        backend.start()
    logger.info("tracking with %s in %s", backend_name, logging_dir)
    return Tracker(backend)
