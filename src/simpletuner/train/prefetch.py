"""The batches of a run, assembled ahead of the step that trains on them.

`BatchFeed` hands the training loop one micro-batch at a time, in the order
(step, micro-batch). With prefetch on, a background thread draws the sampler's
batches and builds them (cache reads, stacking; on-demand encoding when asked)
up to `depth` micro-batches ahead, into pinned memory when the device is CUDA, so
that the copy to the device can be non-blocking. On CUDA (`device`), when the loop
takes a micro-batch, the next one, if already built, starts its copy to the device
on a side stream, so it overlaps this micro-batch's forward and backward; the loop's
stream waits for that copy only when it takes the batch. Without prefetch, each batch
is built when the step asks for it (and copied by the step). Either way the batches, and the caption choices
seeded by (seed, step, micro-batch, rank), are the same.

The sampler runs ahead of training when prefetching: `state_dict` is the
sampler's state after the last micro-batch the loop took (not after the last one
built), so a checkpoint resumes at the first batch not yet trained on.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

MakeBatch = Callable[[Sequence[Any], random.Random, Any], dict[str, Any]]
SeedOf = Callable[[int, int], int]


@dataclass
class _Built:
    step: int
    micro: int
    batch: dict[str, Any] | None
    state: dict[str, Any]  # the sampler's state once this batch was drawn
    epoch: int
    error: BaseException | None = None


class BatchFeed:
    """Micro-batches for steps `start`..`total_steps - 1`, each `accumulation` of them, built ahead or on demand."""

    def __init__(self, sampler: Any, make_batch: MakeBatch, seed_of: SeedOf, *, start: int, total_steps: int,
                 accumulation: int, depth: int = 0, pin: bool = False, device: torch.device | None = None) -> None:
        self._sampler, self._make, self._seed_of = sampler, make_batch, seed_of
        self._start, self._total, self._accumulation = start, total_steps, accumulation
        self._pin = pin
        self._device = device if device is not None and device.type == "cuda" and depth > 0 else None
        self._stream = torch.cuda.Stream(self._device) if self._device is not None else None
        self._staged: _Built | None = None  # the next micro-batch, being copied on the side stream
        self._state, self._epoch = sampler.state_dict(), sampler.epoch
        self._queue: queue.Queue[_Built] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- the loop's side
    def next(self, step: int, micro: int) -> dict[str, Any]:
        """The micro-batch of (step, micro); raises what building it raised."""
        staged, self._staged = self._staged, None
        built = staged or (self._build(step, micro) if self._queue is None else self._queue.get())
        if built.error is not None:
            raise built.error
        assert (built.step, built.micro) == (step, micro), f"feed at {built.step}.{built.micro}, loop at {step}.{micro}"
        self._state, self._epoch = built.state, built.epoch
        assert built.batch is not None
        batch = built.batch
        if self._stream is not None:
            batch = self._arrived(batch) if staged is not None else _on_device(batch, self._device)
            self._stage_next()
        return batch

    def _stage_next(self) -> None:
        """Start copying the next micro-batch to the device on the side stream, if it is already built."""
        assert self._queue is not None and self._stream is not None
        try:
            built = self._queue.get_nowait()
        except queue.Empty:
            return
        if built.batch is not None:
            with torch.cuda.stream(self._stream):
                built.batch = _on_device(built.batch, self._device)
        self._staged = built

    def _arrived(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loop's stream waits for the side stream's copy, and the copies are marked as used by it."""
        current = torch.cuda.current_stream(self._device)
        current.wait_stream(self._stream)
        for tensor in _tensors(batch):
            tensor.record_stream(current)
        return batch

    @property
    def epoch(self) -> int:
        """The sampler's epoch after the last micro-batch taken."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the last micro-batch taken (what a checkpoint saves)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise RuntimeError("load the sampler's state before the feed starts")

    def close(self) -> None:
        """Stop building ahead; waits for the batch being built."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ---------------------------------------------------------------- the builder's side
    def _build(self, step: int, micro: int) -> _Built:
        try:
            refs = next(self._sampler)
            batch = self._make(refs, random.Random(self._seed_of(step, micro)), self._sampler)
            if self._pin:
                batch = _pinned(batch)
            return _Built(step, micro, batch, self._sampler.state_dict(), self._sampler.epoch)
        except Exception as error:  # noqa: BLE001 - handed to the loop, which raises it at this batch
            return _Built(step, micro, None, {}, 0, error)

    def _fill(self) -> None:
        assert self._queue is not None
        for step in range(self._start, self._total):
            for micro in range(self._accumulation):
                built = self._build(step, micro)
                while not self._stop.is_set():
                    try:
                        self._queue.put(built, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set() or built.error is not None:
                    return


def _pinned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {key: _pinned(item) for key, item in value.items()}
    return value


def _on_device(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    return value


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
