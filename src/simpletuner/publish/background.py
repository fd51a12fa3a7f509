"""A background worker: one thread that runs queued jobs in order, each retried with backoff.

Training only enqueues; `close` waits for what is queued. A job that still fails after its tries
is reported through `on_failure` (a short message, never the job's secrets) and dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from simpletuner.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Retry:
    """`tries` attempts, waiting `backoff` seconds after the first failure, doubling each time."""

    tries: int = 3
    backoff: float = 2.0


@dataclass
class BackgroundWorker:
    name: str
    retry: Retry = field(default_factory=Retry)
    describe_error: Callable[[Exception], str] = lambda error: f"{type(error).__name__}: {error}"
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._jobs: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, label: str, job: Callable[[], None]) -> None:
        """Run `job` in the background; `label` names it in reports."""
        self._jobs.put((label, job))

    def pending(self) -> int:
        """Jobs queued and not started yet (about: the worker may take one meanwhile)."""
        return self._jobs.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            label, job = item
            self._run(label, job)

    def _run(self, label: str, job: Callable[[], None]) -> None:
        wait = self.retry.backoff
        for attempt in range(1, self.retry.tries + 1):
            try:
                job()
                return
            except Exception as error:  # reported below; never raised into training
                reason = self.describe_error(error)
                if attempt == self.retry.tries:
                    message = f"{label} failed after {attempt} tries: {reason}"
                    self.failures.append(message)
                    logger.warning("%s: %s", self.name, message)
                    return
                logger.info("%s: %s failed (try %d of %d: %s); retrying in %.1f s", self.name, label, attempt,
                            self.retry.tries, reason, wait)
                time.sleep(wait)
                wait *= 2
