"""Multi-dataset sampler: determinism, ranks, exact resume, repeats, weights and cutoffs."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.data.buckets import BucketAssignment, BucketSettings, assign_buckets
from simpletuner.data.records import ImageRecord, SampleRef
from simpletuner.data.sampler import MultiDatasetSampler, SamplerDataset
from simpletuner.errors import ConfigError, DataError

SETTINGS = BucketSettings(resolution=512, resolution_type="pixel", alignment=64)
SQUARE, WIDE, TALL = (1024, 1024), (1536, 1024), (1024, 1536)  # buckets 512x512, 768x512, 512x768


def assignment(prefix: str, counts: dict[tuple[int, int], int], batch_size: int = 4) -> BucketAssignment:
    sizes = [size for size, n in counts.items() for _ in range(n)]
    recs = [ImageRecord(f"{prefix}/{i:05d}.png", 10, 1.0, w, h) for i, (w, h) in enumerate(sizes)]
    return assign_buckets(recs, SETTINGS, batch_size, seed=0, dataset_id=prefix)


def take(sampler: MultiDatasetSampler, n: int) -> list[list[SampleRef]]:
    return [next(sampler) for _ in range(n)]


def epoch(sampler: MultiDatasetSampler) -> list[list[SampleRef]]:
    """The batches of the sampler's current epoch from its current step on."""
    return take(sampler, sampler.steps_in_epoch - sampler.step)


@pytest.fixture(scope="module")
def photos() -> BucketAssignment:
    return assignment("photos", {SQUARE: 48, WIDE: 24, TALL: 24})


@pytest.fixture(scope="module")
def art() -> BucketAssignment:
    return assignment("art", {SQUARE: 16, WIDE: 8})


def two_datasets(photos, art, **kw) -> list[SamplerDataset]:
    return [SamplerDataset("photos", photos), SamplerDataset("art", art, **kw)]


def test_batches_come_from_one_bucket_of_one_dataset(photos, art):
    sampler = MultiDatasetSampler(two_datasets(photos, art), 4, seed=1)
    datasets = {"photos": photos, "art": art}
    for batch in epoch(sampler):
        assert len(batch) == 4
        assert len({(ref.dataset_id, ref.bucket) for ref in batch}) == 1
        for ref in batch:
            source = datasets[ref.dataset_id]
            assert source.records[ref.record].path == ref.path
            assert source.plan(ref.record).target_size == ref.bucket


def test_deterministic_for_a_seed(photos, art):
    first = take(MultiDatasetSampler(two_datasets(photos, art), 4, seed=5), 60)
    again = take(MultiDatasetSampler(two_datasets(photos, art), 4, seed=5), 60)
    other = take(MultiDatasetSampler(two_datasets(photos, art), 4, seed=6), 60)
    assert first == again
    assert first != other
    # epochs differ from one another too
    sampler = MultiDatasetSampler(two_datasets(photos, art), 4, seed=5)
    assert epoch(sampler) != epoch(sampler)


def test_every_sample_once_per_epoch_on_one_rank(photos, art):
    sampler = MultiDatasetSampler(two_datasets(photos, art), 4, seed=2)
    for _ in range(2):
        seen = Counter((ref.dataset_id, ref.path) for batch in epoch(sampler) for ref in batch)
        assert len(seen) == len(photos) + len(art) and set(seen.values()) == {1}
    assert sampler.trimmed_samples == {"photos": 0, "art": 0}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_covering_the_epoch(photos, art, world_size, caplog):
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        samplers = [
            MultiDatasetSampler(two_datasets(photos, art), 4, seed=3, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        steps = {s.steps_in_epoch for s in samplers}
        assert len(steps) == 1  # every rank takes the same number of steps
        per_rank = [[(ref.dataset_id, ref.path) for batch in epoch(s) for ref in batch] for s in samplers]
    everything = Counter(sample for rank in per_rank for sample in rank)
    assert set(everything.values()) == {1}  # disjoint: no sample on two ranks (or twice on one)
    assert len(everything) == len(photos) + len(art)  # full coverage: batches split evenly over the ranks
    assert all(s.trimmed_samples == {"photos": 0, "art": 0} for s in samplers)
    assert "left out" not in caplog.text


def test_trimming_is_counted_and_logged(caplog):
    odd = assignment("odd", {SQUARE: 10, WIDE: 7})  # per epoch: 2 + 1 full batches, 2 + 3 samples over
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        samplers = [MultiDatasetSampler([SamplerDataset("odd", odd)], 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
        for _ in range(3):
            per_rank = [[ref.path for batch in epoch(s) for ref in batch] for s in samplers]
            seen = Counter(path for rank in per_rank for path in rank)
            assert set(seen.values()) == {1}
            # 3 batches over 2 ranks: one more batch left out; every sample is seen or counted
            assert samplers[0].trimmed_samples == samplers[1].trimmed_samples == {"odd": 2 + 3 + 4}
            assert len(seen) + 9 == len(odd)
    assert "dataset 'odd': 9 of 17 samples per epoch are left out" in caplog.text


@pytest.mark.parametrize("steps_before", [0, 5, 17, 30, 41])
def test_resume_mid_epoch_continues_exactly(photos, art, steps_before):
    def make(rank: int) -> MultiDatasetSampler:
        return MultiDatasetSampler(two_datasets(photos, art, repeats=1), 4, seed=11, rank=rank, world_size=2)

    for rank in (0, 1):
        uninterrupted = take(make(rank), steps_before + 40)  # crosses into the next epoch
        first = make(rank)
        take(first, steps_before)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        assert len(json.dumps(state)) < 300
        resumed = make(rank)
        resumed.load_state_dict(state)
        assert take(resumed, 40) == uninterrupted[steps_before:]


def test_resume_refuses_another_rank_or_batch_size(photos, art):
    state = MultiDatasetSampler(two_datasets(photos, art), 4, seed=1, rank=0, world_size=2).state_dict()
    with pytest.raises(ConfigError, match="saved by rank 0, this is rank 1"):
        MultiDatasetSampler(two_datasets(photos, art), 4, seed=1, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="train_batch_size 4, this run has 2"):
        MultiDatasetSampler(two_datasets(photos, art), 2, seed=1, rank=0, world_size=4).load_state_dict(state)


def elastic_epoch(datasets, batch_size, sizes_and_steps, seed=3):
    """Run epoch 0 as segments [(world_size, steps), ...] (the last runs to the epoch's end), each resumed
    from the previous one's state (rank 0's at another world size, as a checkpoint gives it); every sample
    handed out in epoch 0, per segment."""
    states, seen = None, []
    for number, (world_size, wanted) in enumerate(sizes_and_steps):
        samplers = [MultiDatasetSampler(datasets, batch_size, seed=seed, rank=r, world_size=world_size)
                    for r in range(world_size)]
        if states is not None:
            same = len(states) == world_size
            for rank, sampler in enumerate(samplers):
                sampler.load_state_dict(json.loads(json.dumps(states[rank if same else 0])))
        steps = [s.steps_in_epoch for s in samplers]  # plans the epoch: may move past an epoch with nothing left
        left = [n - s.step if s.epoch == 0 else 0 for n, s in zip(steps, samplers)]
        assert len(set(left)) == 1
        count = left[0] if number == len(sizes_and_steps) - 1 else min(wanted, max(0, left[0] - 1))
        batches = [take(sampler, count) for sampler in samplers]
        assert len({(s.epoch, s.step) for s in samplers}) == 1
        seen.append([ref for rank in batches for batch in rank for ref in batch])
        states = [sampler.state_dict() for sampler in samplers]
    return seen, samplers[0]


@pytest.mark.parametrize("sizes", [[4, 2], [2, 3], [2, 1], [1, 4], [3, 2, 5], [2, 4, 1]])
def test_elastic_resume_re_deals_the_rest_of_the_epoch(photos, art, sizes):
    datasets = two_datasets(photos, art, repeats=1)
    plan = [(size, 5) for size in sizes]
    seen, last = elastic_epoch(datasets, 4, plan)
    counts = Counter((ref.dataset_id, ref.path) for segment in seen for ref in segment)
    assert max(counts.values()) <= 2  # art has one repeat: at most twice; photos once
    assert all(n == 1 for (dataset, _), n in counts.items() if dataset == "photos")
    assert all(ref.epoch == 0 for segment in seen for ref in segment)
    # only a dataset's last (remaining batches mod the final world size) batches are left out
    per_epoch = {"photos": len(photos), "art": 2 * len(art)}
    for dataset_id, total in per_epoch.items():
        got = sum(n for (d, _), n in counts.items() if d == dataset_id)
        assert 0 <= total - got < 4 * sizes[-1]
    assert last.epoch == 1 and last.step == 0 and last.segments == []
    nxt = next(last)  # the next epoch is dealt over the new world size from its start
    assert nxt[0].epoch == 1


def test_elastic_resume_logs_how_the_epoch_is_re_dealt(photos, art, caplog):
    first = MultiDatasetSampler(two_datasets(photos, art), 4, seed=1, rank=0, world_size=4)
    take(first, 3)
    with caplog.at_level(logging.INFO, logger="simpletuner"):
        MultiDatasetSampler(two_datasets(photos, art), 4, seed=1, rank=0, world_size=2).load_state_dict(
            first.state_dict())
    assert "made by 4 rank(s), this run has 2: the rest of epoch 0 (after 3 step(s) at 4 rank(s))" in caplog.text


def test_same_world_size_resume_after_an_elastic_one_continues_exactly(photos, art):
    datasets = two_datasets(photos, art)
    base = MultiDatasetSampler(datasets, 4, seed=5, rank=0, world_size=4)
    take(base, 2)
    def resumed(rank):
        sampler = MultiDatasetSampler(datasets, 4, seed=5, rank=rank, world_size=2)
        sampler.load_state_dict(base.state_dict())
        return sampler
    uninterrupted = take(resumed(1), 30)
    again = resumed(1)
    take(again, 4)
    state = json.loads(json.dumps(again.state_dict()))
    assert state["segments"] == [[4, 2]]
    later = MultiDatasetSampler(datasets, 4, seed=5, rank=1, world_size=2)
    later.load_state_dict(state)
    assert take(later, 26) == uninterrupted[4:]


try:
    from hypothesis import given, settings as hsettings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:
    @hsettings(max_examples=60, deadline=None)
    @given(
        square=st.integers(0, 30), wide=st.integers(0, 20), batch_size=st.integers(1, 4), repeats=st.integers(0, 2),
        sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 8)), min_size=2, max_size=4),
        seed=st.integers(0, 2**32),
    )
    def test_elastic_resume_never_repeats_or_skips_a_sample(square, wide, batch_size, repeats, sizes, seed):
        data = assignment("prop", {SQUARE: square + 20, WIDE: wide}, batch_size)
        datasets = [SamplerDataset("prop", data, repeats=repeats)]
        seen, _ = elastic_epoch(datasets, batch_size, sizes, seed=seed)
        counts = Counter(ref.path for segment in seen for ref in segment)
        assert max(counts.values(), default=0) <= 1 + repeats
        # the whole epoch's batches, less those whole rank groups could not hold at the world size that ended it
        full_batches = int((data.bucket_counts() * (1 + repeats) // batch_size).sum())
        got_batches = sum(len(segment) for segment in seen) // batch_size
        assert 0 <= full_batches - got_batches < max(size for size, _ in sizes)


def test_repeats_multiply_an_epoch(photos, art):
    sampler = MultiDatasetSampler(two_datasets(photos, art, repeats=2), 4, seed=4)
    seen = Counter((ref.dataset_id, ref.path) for batch in epoch(sampler) for ref in batch)
    assert {n for (dataset, _), n in seen.items() if dataset == "art"} == {3}
    assert {n for (dataset, _), n in seen.items() if dataset == "photos"} == {1}
    assert sampler.steps_in_epoch == (len(photos) + 3 * len(art)) // 4


def positions(batches: list[list[SampleRef]], dataset_id: str) -> np.ndarray:
    return np.array([i for i, batch in enumerate(batches) if batch[0].dataset_id == dataset_id])


def test_probability_shapes_when_a_dataset_is_drawn(photos):
    twin = assignment("twin", {SQUARE: 48, WIDE: 24, TALL: 24})
    datasets = [SamplerDataset("photos", photos, probability=4.0), SamplerDataset("twin", twin, probability=1.0)]
    batches = epoch(MultiDatasetSampler(datasets, 4, seed=8))
    assert len(positions(batches, "photos")) == len(positions(batches, "twin")) == 24  # both seen in full
    assert positions(batches, "photos").mean() < positions(batches, "twin").mean() - 8  # but photos earlier
    never = [SamplerDataset("photos", photos), SamplerDataset("twin", twin, probability=0.0)]
    sampler = MultiDatasetSampler(never, 4, seed=8)
    assert {batch[0].dataset_id for batch in take(sampler, 60)} == {"photos"}


def test_auto_weighting_spreads_datasets_and_uniform_does_not():
    big = assignment("big", {SQUARE: 400})
    small = assignment("small", {SQUARE: 40})
    datasets = [SamplerDataset("big", big), SamplerDataset("small", small)]
    auto = epoch(MultiDatasetSampler(datasets, 4, seed=1, sampling="auto-weighting"))
    uniform = epoch(MultiDatasetSampler(datasets, 4, seed=1, sampling="uniform"))
    assert len(auto) == len(uniform) == 110
    assert positions(auto, "small").mean() > 35  # spread over the epoch (about 55)
    assert positions(uniform, "small").mean() < 25  # half of the early draws: exhausted early (about 10)


def test_disable_after_epoch_step(photos, art):
    sampler = MultiDatasetSampler(two_datasets(photos, art, disable_after_epoch_step=5), 4, seed=9)
    for _ in range(3):  # every epoch: art only within its first 5 steps, photos in full
        batches = epoch(sampler)
        art_steps = positions(batches, "art")
        assert all(art_steps < 5) and len(positions(batches, "photos")) == 24
        assert len(batches) == 24 + len(art_steps)
    unlimited = epoch(MultiDatasetSampler(two_datasets(photos, art), 4, seed=9))
    assert positions(unlimited, "art").max() >= 5 and len(positions(unlimited, "art")) == 6
    with_accumulation = MultiDatasetSampler(
        two_datasets(photos, art, disable_after_epoch_step=3), 4, seed=9, gradient_accumulation_steps=2
    )
    art_steps = positions(epoch(with_accumulation), "art")
    assert len(art_steps) > 0 and all(art_steps < 6)  # 3 optimiser steps = 6 batches


def test_an_epoch_without_any_batch_is_a_data_error(art):
    sampler = MultiDatasetSampler([SamplerDataset("art", art)], 32, seed=0)
    with pytest.raises(DataError, match="(?s)no dataset yields a batch: batch size 32.*'art': 24 image"):
        next(sampler)


def test_more_ranks_than_full_batches_is_a_data_error_naming_the_process_count(art):
    batches = MultiDatasetSampler([SamplerDataset("art", art)], 4, seed=0).steps_in_epoch
    ranks = 8
    assert 0 < batches < ranks  # one rank alone would have steps
    sampler = MultiDatasetSampler([SamplerDataset("art", art)], 4, seed=0, rank=1, world_size=ranks)
    with pytest.raises(DataError, match=r"(?s)batch size 4, 8 rank\(s\).*needs 8 full batches for one step; use "
                                        r"fewer processes"):
        next(sampler)


def test_from_config(photos):
    training = TrainingConfig(model_family="sdxl", pretrained_model_name_or_path="tiny", train_batch_size=4,
                              seed=7, data_backend_sampling="uniform")
    config = DatasetConfig(id="photos", instance_data_dir="/data", repeats=2, probability=0.5,
                           disable_after_epoch_step=100)
    dataset = SamplerDataset.from_config(config, photos)
    assert (dataset.repeats, dataset.probability, dataset.disable_after_epoch_step) == (2, 0.5, 100)
    sampler = MultiDatasetSampler.from_config(training, [dataset], rank=1, world_size=2)
    assert (sampler.batch_size, sampler.seed, sampler.sampling, sampler.rank) == (4, 7, "uniform", 1)
