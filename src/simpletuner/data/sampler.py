"""Batches from several datasets: one bucket of one dataset per batch, deterministic, resumable.

What an epoch is. For each dataset, an epoch is (1 + repeats) passes over its
usable images: each pass is shuffled within buckets, the passes of a bucket are
chained and cut into batches, and the batches are shuffled. Batches are dealt to
ranks in groups of `world_size` (rank r takes the r-th batch of each group), so
ranks see disjoint batches and take the same number of steps. The sampler's epoch
interleaves the datasets' epochs and ends when every dataset that takes part is
exhausted: a dataset takes part while its probability is above zero and, with
disable_after_epoch_step, only during the first that many (optimiser) steps of
each epoch. So probability and data_backend_sampling shape *when* a dataset is
sampled during the epoch, not how much of it is seen.

Interleaving: at every step the next dataset is drawn among those with batches
left, with weight len(images) * (1 + repeats) * probability (auto-weighting) or
probability alone (uniform, as SimpleTuner). This is done in one vectorised pass:
each dataset's batches get exponential arrival times at rate = its weight and the
merged order of arrivals is exactly that step-by-step draw.

Trimming: a bucket's (images * (1 + repeats)) mod batch_size samples, and a
dataset's (batches mod world_size) batches, are left out of an epoch; which ones
changes every epoch. The count is in `trimmed_samples` and logged as a warning.

Resume: the state is (seed, epoch, step) and a few checks. Everything else is
rebuilt from the seed, so a resumed sampler yields exactly the batches the
uninterrupted one would have. Memory stays at a few integers per image (numpy).

Resume on another number of ranks (elastic): the state also lists the segments of
the current epoch already run at other world sizes, as (world_size, steps). The
epoch's plan replays them to learn which batches of each dataset's shuffled order
were taken; the rest of the epoch is re-dealt over the new ranks in groups of the
new world size, interleaved again from the seed. No batch of the epoch is taken
twice, and none is left out except a dataset's last (remaining batches mod world
size) ones, the same rule as an uninterrupted epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simpletuner.data.buckets import BucketAssignment
from simpletuner.data.records import SampleRef
from simpletuner.errors import ConfigError, DataError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig

logger = get_logger(__name__)

_STATE_VERSION = 1
_SAMPLING = ("auto-weighting", "uniform")


@dataclass(frozen=True)
class SamplerDataset:
    """One dataset as the sampler sees it: its buckets and how often to draw from it."""

    dataset_id: str
    assignment: BucketAssignment
    repeats: int = 0
    probability: float = 1.0
    disable_after_epoch_step: int | None = None

    @classmethod
    def from_config(cls, config: DatasetConfig, assignment: BucketAssignment) -> SamplerDataset:
        return cls(config.id, assignment, config.repeats, config.probability, config.disable_after_epoch_step)


@dataclass
class _DatasetEpoch:
    """One dataset's batches for one epoch, already shuffled and trimmed to whole rank groups.

    Batches are numbered bucket by bucket (bucket 0's first, then bucket 1's...);
    `batch_order` is the shuffled sequence of those numbers.
    """

    passes: np.ndarray  # (1 + repeats, images) record positions; each pass shuffled within buckets
    batch_order: np.ndarray  # all shuffled batch numbers; a segment deals them from `start` on
    first_batch: np.ndarray  # number of each bucket's first batch
    trimmed: int  # samples left out this epoch

    def locate(self, number: int, batch_size: int) -> tuple[int, int]:
        """(bucket, first position in the bucket's chained passes) of a batch number."""
        bucket = int(np.searchsorted(self.first_batch, number, side="right")) - 1
        return bucket, (number - int(self.first_batch[bucket])) * batch_size


@dataclass
class _EpochPlan:
    epoch: int
    datasets: list[_DatasetEpoch]
    step_dataset: np.ndarray  # which dataset each step draws from (its next group of world_size batches)
    start: np.ndarray  # per dataset: batches of batch_order taken by earlier segments of the epoch

    @property
    def steps(self) -> int:
        return int(self.step_dataset.shape[0])


class MultiDatasetSampler:
    """Yields lists of `batch_size` SampleRefs for this rank, forever, epoch after epoch."""

    def __init__(
        self,
        datasets: Sequence[SamplerDataset],
        batch_size: int,
        *,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        sampling: str = "auto-weighting",
        gradient_accumulation_steps: int = 1,
    ) -> None:
        _check_arguments(datasets, batch_size, rank, world_size, sampling, gradient_accumulation_steps)
        self.datasets = list(datasets)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.sampling, self.accumulation = sampling, gradient_accumulation_steps
        self.seed = 0 if seed is None else int(seed)
        self.epoch, self.step = 0, 0
        self.trimmed_samples: dict[str, int] = {}
        self._plan: _EpochPlan | None = None
        self._taken = np.zeros(len(self.datasets), dtype=np.int64)
        self._warned: set[str] = set()
        self.segments: list[tuple[int, int]] = []  # this epoch's earlier (world_size, steps), after elastic resumes

    @classmethod
    def from_config(
        cls, training: TrainingConfig, datasets: Sequence[SamplerDataset], rank: int = 0, world_size: int = 1
    ) -> MultiDatasetSampler:
        return cls(
            datasets,
            training.train_batch_size,
            seed=training.seed,
            rank=rank,
            world_size=world_size,
            sampling=training.data_backend_sampling,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
        )

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[list[SampleRef]]:
        return self

    def __next__(self) -> list[SampleRef]:
        plan = self._current_plan()
        batch = self._batch(plan, self.step)
        self.step += 1
        if self.step == plan.steps:  # the next epoch's plan is built when its first batch is asked for
            self.epoch, self.step, self.segments = self.epoch + 1, 0, []
        return batch

    @property
    def steps_in_epoch(self) -> int:
        """Steps (batches per rank) in the current epoch; `step` counts those already taken."""
        return self._current_plan().steps

    def _current_plan(self) -> _EpochPlan:
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = None  # let the old plan go before the new one is built
            self._plan = self._plan_epoch(self.epoch)
            if self._plan.steps == 0 and self.segments:  # a re-dealt rest too small for one group each
                self.epoch, self.step, self.segments = self.epoch + 1, 0, []
                return self._current_plan()
            if self._plan.steps == 0:
                raise DataError(self._empty_epoch_message())
            # groups each dataset has handed out before `step` (non-zero after a resume)
            self._taken = np.bincount(self._plan.step_dataset[: self.step], minlength=len(self.datasets))
        return self._plan

    def _batch(self, plan: _EpochPlan, step: int) -> list[SampleRef]:
        index = int(plan.step_dataset[step])
        dataset, epoch = self.datasets[index], plan.datasets[index]
        group = int(self._taken[index])
        self._taken[index] += 1
        position = int(plan.start[index]) + group * self.world_size + self.rank
        bucket, start = epoch.locate(int(epoch.batch_order[position]), self.batch_size)
        assignment = dataset.assignment
        images = int(assignment.bucket_offsets[bucket + 1] - assignment.bucket_offsets[bucket])
        chained = start + np.arange(self.batch_size)
        records = epoch.passes[chained // images, int(assignment.bucket_offsets[bucket]) + chained % images]
        size = assignment.buckets[bucket]
        return [
            SampleRef(dataset.dataset_id, assignment.records[record].path, size, record, plan.epoch)
            for record in records.tolist()
        ]

    # ------------------------------------------------------------------ planning

    def _plan_epoch(self, epoch: int) -> _EpochPlan:
        epochs = [self._dataset_epoch(dataset, epoch) for dataset in self.datasets]
        start = np.zeros(len(self.datasets), dtype=np.int64)
        offset = 0  # steps of earlier segments, for disable_after_epoch_step
        for segment, (world_size, steps) in enumerate(self.segments):
            step_dataset = self._segment(epochs, start, world_size, segment, epoch, offset)
            start += np.bincount(step_dataset[:steps], minlength=len(self.datasets)) * world_size
            offset += steps
        step_dataset = self._segment(epochs, start, self.world_size, len(self.segments), epoch, offset)
        for dataset, planned, taken in zip(self.datasets, epochs, start.tolist()):
            self._report_trim(dataset, planned, taken)
        return _EpochPlan(epoch, epochs, step_dataset, start)

    def _segment(self, epochs: list[_DatasetEpoch], start: np.ndarray, world_size: int, segment: int,
                 epoch: int, offset: int) -> np.ndarray:
        """Which dataset each step of one segment draws from: its batches from `start` on, dealt over
        `world_size` ranks. Segment 0 is the whole epoch when no resume changed the world size."""
        key = [self.seed % 2**64, epoch, 0] + ([segment] if segment else [])
        groups = [(len(planned.batch_order) - int(first)) // world_size for planned, first in zip(epochs, start)]
        return self._apply_cutoffs(self._interleave(groups, np.random.default_rng(key)), offset)

    def _dataset_epoch(self, dataset: SamplerDataset, epoch: int) -> _DatasetEpoch:
        assignment = dataset.assignment
        rng = np.random.default_rng([self.seed % 2**64, epoch, _stable_int(dataset.dataset_id)])
        offsets = assignment.bucket_offsets.tolist()
        passes = np.empty((1 + dataset.repeats, len(assignment)), dtype=assignment.order.dtype)
        for chain in passes:
            for start, stop in zip(offsets[:-1], offsets[1:]):
                chain[start:stop] = assignment.order[start + rng.permutation(stop - start)]
        chained = assignment.bucket_counts() * (1 + dataset.repeats)
        per_bucket = chained // self.batch_size
        total = int(per_bucket.sum())
        batch_order = np.arange(total, dtype=np.int32 if total < 2**31 else np.int64)
        rng.shuffle(batch_order)
        trimmed = int((chained % self.batch_size).sum())
        return _DatasetEpoch(passes, batch_order, np.cumsum(per_bucket) - per_bucket, trimmed)

    def _interleave(self, groups: list[int], rng: np.random.Generator) -> np.ndarray:
        """Which dataset each step draws from: merged exponential arrivals, one per group of batches."""
        label = np.int16 if len(self.datasets) < 2**15 else np.int32
        taking_part = [
            (index, count) for index, count in enumerate(groups) if self._weight(self.datasets[index]) > 0 and count > 0
        ]
        if len(taking_part) <= 1:
            return np.full(taking_part[0][1] if taking_part else 0, taking_part[0][0] if taking_part else 0, label)
        counts = [count for _, count in taking_part]
        arrivals = np.empty(sum(counts), dtype=np.float64)
        start = 0
        for index, count in taking_part:
            rate = self._weight(self.datasets[index])
            np.cumsum(rng.exponential(1.0 / rate, count), out=arrivals[start : start + count])
            start += count
        order = np.argsort(arrivals, kind="stable")
        del arrivals
        return np.repeat(np.array([index for index, _ in taking_part], dtype=label), counts)[order]

    def _apply_cutoffs(self, step_dataset: np.ndarray, offset: int = 0) -> np.ndarray:
        """Drop a dataset's steps from its cutoff on; earlier cutoffs first, so later positions settle.
        `offset`: steps of the epoch run before this segment."""
        cutoffs = sorted(
            (max(0, dataset.disable_after_epoch_step * self.accumulation - offset), index)
            for index, dataset in enumerate(self.datasets)
            if dataset.disable_after_epoch_step is not None
        )
        for cutoff, index in cutoffs:
            tail = step_dataset[cutoff:]
            step_dataset = np.concatenate([step_dataset[:cutoff], tail[tail != index]])
        return step_dataset

    def _weight(self, dataset: SamplerDataset) -> float:
        if self.sampling == "uniform":
            return float(dataset.probability)
        return len(dataset.assignment) * (1 + dataset.repeats) * float(dataset.probability)

    def _report_trim(self, dataset: SamplerDataset, planned: _DatasetEpoch, taken: int = 0) -> None:
        trimmed = planned.trimmed + (len(planned.batch_order) - taken) % self.world_size * self.batch_size
        self.trimmed_samples[dataset.dataset_id] = trimmed
        if trimmed and dataset.dataset_id not in self._warned:
            self._warned.add(dataset.dataset_id)
            per_epoch = len(dataset.assignment) * (1 + dataset.repeats)
            logger.warning(
                "dataset %r: %d of %d samples per epoch are left out so that every batch is full "
                "(batch size %d) and %d rank(s) get equal batches; a different set each epoch",
                dataset.dataset_id, trimmed, per_epoch, self.batch_size, self.world_size,
            )

    def _empty_epoch_message(self) -> str:
        lines = [f"no dataset yields a batch: batch size {self.batch_size}, {self.world_size} rank(s)"]
        for dataset in self.datasets:
            counts = dataset.assignment.bucket_counts() * (1 + dataset.repeats)
            batches = int((counts // self.batch_size).sum())
            lines.append(
                f"  - {dataset.dataset_id!r}: {len(dataset.assignment)} image(s), repeats {dataset.repeats}, "
                f"probability {dataset.probability:g}, {batches} full batch(es) per epoch"
            )
        if self.world_size > 1:  # every step deals one batch to each rank: a dataset needs world_size of them
            lines.append(f"each step takes one full batch per rank: a dataset needs {self.world_size} full batches "
                         f"for one step; use fewer processes, or")
        lines.append("lower train_batch_size, raise repeats or probability, or add images")
        return "\n".join(lines)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Small: where this rank is (seed, epoch, step) and what to check on resume."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "datasets": {d.dataset_id: len(d.assignment) for d in self.datasets},
            "segments": [list(segment) for segment in self.segments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved sampler stopped. Saved at another world size (any rank's
        state will do: they share epoch and step), the rest of the epoch is re-dealt over this run's ranks."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}")
        if state["batch_size"] != self.batch_size:
            raise ConfigError(f"sampler state was saved with train_batch_size {state['batch_size']}, this run has "
                              f"{self.batch_size}: resume with the same train_batch_size")
        same_world = state["world_size"] == self.world_size
        if same_world and state["rank"] != self.rank:
            raise ConfigError(f"sampler state was saved by rank {state['rank']}, this is rank {self.rank}")
        current = {d.dataset_id: len(d.assignment) for d in self.datasets}
        if state["datasets"] != current:
            logger.warning(
                "datasets changed since the checkpoint (%s, now %s): the resumed batches differ from the "
                "uninterrupted run's", state["datasets"], current,
            )
        self.seed, self.epoch, self.step = int(state["seed"]), int(state["epoch"]), int(state["step"])
        self.segments = [(int(w), int(s)) for w, s in state.get("segments", [])]
        if not same_world and self.step:
            self.segments.append((int(state["world_size"]), self.step))
            self.step = 0
            if self.rank == 0:
                logger.info("the checkpoint was made by %d rank(s), this run has %d: the rest of epoch %d "
                            "(after %d step(s) at %s rank(s)) is re-dealt over %d rank(s), no sample twice",
                            state["world_size"], self.world_size, self.epoch, sum(s for _, s in self.segments),
                            "/".join(str(w) for w, _ in self.segments), self.world_size)
        self._plan = None


def _check_arguments(
    datasets: Sequence[SamplerDataset], batch_size: int, rank: int, world_size: int, sampling: str, accumulation: int
) -> None:
    if not datasets:
        raise DataError("no image dataset to sample from")
    ids = [d.dataset_id for d in datasets]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"dataset ids must be unique, got {ids}")
    if batch_size < 1 or accumulation < 1:
        raise ConfigError(
            f"train_batch_size and gradient_accumulation_steps must be at least 1, got {batch_size}, {accumulation}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if sampling not in _SAMPLING:
        raise ConfigError(f"data_backend_sampling {sampling!r} is not one of {', '.join(_SAMPLING)}")
    for d in datasets:
        if d.repeats < 0 or d.probability < 0:
            raise ConfigError(f"dataset {d.dataset_id!r}: repeats and probability must be >= 0")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
