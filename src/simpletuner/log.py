"""Logging: quiet by default, talkative with SIMPLETUNER_LOG_LEVEL=DEBUG.

`SIMPLETUNER_TRAINING_LOOP_LOG_LEVEL` sets the level of the per-step timing
logger (`simpletuner.train.loop`) on its own, as in SimpleTuner.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "simpletuner"
LOOP_LOGGER = "simpletuner.train.loop"


def _level(variable: str, default: str) -> int:
    name = os.environ.get(variable, default).upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.getLevelName(default)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced after set-up, e.g. by a test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


def setup_logging() -> None:
    """Configure the `simpletuner` loggers from the environment (idempotent)."""
    root = logging.getLogger(ROOT)
    root.setLevel(_level("SIMPLETUNER_LOG_LEVEL", "WARNING"))
    if not any(getattr(h, "_simpletuner", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._simpletuner = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    if root.level > logging.INFO:  # the libraries' own chatter follows our quiet default
        for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
            os.environ.setdefault(variable, "error")
    loop_level = os.environ.get("SIMPLETUNER_TRAINING_LOOP_LOG_LEVEL")
    if loop_level:
        logging.getLogger(LOOP_LOGGER).setLevel(_level("SIMPLETUNER_TRAINING_LOOP_LOG_LEVEL", "WARNING"))


def get_logger(name: str) -> logging.Logger:
    """A logger under the `simpletuner` namespace."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
