"""What a training run tells the world: one seam the loop calls, many subscribers.

The loop calls one `TrainingEvents` object at the start, after every logging step, after every
validation and checkpoint, on an error and at the end. `EventFanout` hands each call to its
subscribers (the Hub uploader, webhooks, the run page) and keeps a failing subscriber from ever
breaking training: its error becomes a warning. Subscribers that do slow work (network) do it in
their own background thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.train.setup import Run

logger = get_logger(__name__)


class TrainingEvents(Protocol):
    """Everything a subscriber may hear; each method returns quickly."""

    def on_start(self, run: Run, step: int) -> None: ...
    def on_progress(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_validation(self, step: int, images: list[Path]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_finish(self, step: int, outputs: list[Path]) -> None: ...
    def close(self) -> None: ...


class NoEvents:
    """A subscriber that does nothing; subclass it and override what you need."""

    def on_start(self, run: Run, step: int) -> None:
        pass

    def on_progress(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_validation(self, step: int, images: list[Path]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_error(self, message: str) -> None:
        pass

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        pass

    def close(self) -> None:
        """Wait for background work (uploads, messages) to end; called once, last."""


class EventFanout(NoEvents):
    """Calls every subscriber in order; a subscriber's exception is logged, never raised."""

    def __init__(self, subscribers: Sequence[Any] = ()) -> None:
        self.subscribers = list(subscribers)

    def _each(self, method: str, *args: Any) -> None:
        for subscriber in self.subscribers:
            try:
                getattr(subscriber, method)(*args)
            except Exception as error:  # a subscriber never breaks training
                logger.warning("%s.%s failed: %s", type(subscriber).__name__, method, error)

    def on_start(self, run: Run, step: int) -> None:
        self._each("on_start", run, step)

    def on_progress(self, step: int, metrics: dict[str, float]) -> None:
        self._each("on_progress", step, metrics)

    def on_validation(self, step: int, images: list[Path]) -> None:
        self._each("on_validation", step, images)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._each("on_checkpoint", step, path)

    def on_error(self, message: str) -> None:
        self._each("on_error", message)

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        self._each("on_finish", step, outputs)

    def close(self) -> None:
        self._each("close")
