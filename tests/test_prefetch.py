"""BatchFeed: batches built ahead in a thread are the step-by-step batches, the saved sampler state is that of
the batches taken, and on CUDA the next batch is copied on a side stream while the step runs."""

from __future__ import annotations

import random
import time

import pytest
import torch

from simpletuner.train.prefetch import BatchFeed


class Counting:
    """A sampler of batch numbers whose state is how many it drew."""

    epoch = 1

    def __init__(self) -> None:
        self.drawn = 0

    def __next__(self) -> int:
        self.drawn += 1
        return self.drawn - 1

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}


def _make(ref: int, rng: random.Random, refill) -> dict:
    return {"latents": torch.full((2, 4), float(ref)), "text": {"embeds": torch.full((2, 3), rng.random())},
            "captions": [f"caption {ref}"]}


def _seed(step: int, micro: int) -> int:
    return step * 10 + micro


def _taken(feed: BatchFeed, steps: range, accumulation: int) -> list[dict]:
    return [feed.next(step, micro) for step in steps for micro in range(accumulation)]


def test_built_ahead_equals_step_by_step_and_state_is_of_the_batches_taken():
    plain = BatchFeed(Counting(), _make, _seed, start=0, total_steps=6, accumulation=2)
    sampler = Counting()
    ahead = BatchFeed(sampler, _make, _seed, start=0, total_steps=6, accumulation=2, depth=4)
    first = _taken(ahead, range(0, 2), 2)
    give_up = time.monotonic() + 30
    while sampler.drawn < 9 and time.monotonic() < give_up:  # the thread runs ahead of the loop
        time.sleep(0.01)
    assert sampler.drawn == 9  # 4 taken, 4 queued, 1 built and waiting for room
    assert ahead.state_dict() == {"drawn": 4}  # a checkpoint now resumes at the fifth micro-batch
    rest = _taken(ahead, range(2, 6), 2)
    ahead.close()
    expected = _taken(plain, range(0, 6), 2)
    for got, want in zip(first + rest, expected, strict=True):
        assert torch.equal(got["latents"], want["latents"]) and got["captions"] == want["captions"]
        assert torch.equal(got["text"]["embeds"], want["text"]["embeds"])  # the same caption draws
    assert ahead.state_dict() == plain.state_dict() == {"drawn": 12}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_next_batch_arrives_copied_on_a_side_stream():
    device = torch.device("cuda")
    sampler = Counting()
    feed = BatchFeed(sampler, _make, _seed, start=0, total_steps=8, accumulation=1, depth=3, pin=True, device=device)
    plain = BatchFeed(Counting(), _make, _seed, start=0, total_steps=8, accumulation=1)
    staged = 0
    for step in range(8):
        batch = feed.next(step, 0)
        want = plain.next(step, 0)
        assert batch["latents"].device.type == "cuda" and batch["text"]["embeds"].device.type == "cuda"
        torch.cuda.synchronize()
        assert torch.equal(batch["latents"].cpu(), want["latents"]) and batch["captions"] == want["captions"]
        assert torch.equal(batch["text"]["embeds"].cpu(), want["text"]["embeds"])
        staged += feed._staged is not None  # the next batch's copy was started on the side stream
        assert feed.state_dict() == {"drawn": step + 1}
    feed.close()
    assert staged > 0
