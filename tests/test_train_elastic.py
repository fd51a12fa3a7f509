"""Elastic resume end to end: a checkpoint of a 2-process CPU run (gloo) resumes with 1 and with 3 processes, one
of a 4-process run with 2.

The resumed runs take only the batches of the epoch the 2-process run had not taken, and
resume_keep_global_batch keeps processes x gradient_accumulation_steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import write_run

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "two_rank_train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SIMPLETUNER_LOG_LEVEL": "INFO"}


def launch(config: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    out.mkdir()
    command = [sys.executable, str(SCRIPT), str(config), str(out)]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(29500 + os.getpid() % 1000 + processes), *command[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)


def seen(out: Path, processes: int) -> list[list[str]]:
    return [json.loads((out / f"rank{rank}.json").read_text())["seen"] for rank in range(processes)]


def test_a_two_process_checkpoint_resumes_on_one_and_on_three(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    # 16 images, batch 2: 8 batches an epoch; with 2 processes 4 steps; stop and save after 2 of them
    first = write_run(tmp_path / "two", model, "sd1x", images=16, max_train_steps=2, checkpointing_steps=2,
                      disable_validation=True)
    done = launch(first, tmp_path / "two-out", 2)
    assert done.returncode == 0, done.stderr[-4000:]
    before = {path for rank in seen(tmp_path / "two-out", 2) for batch in rank for path in batch}
    assert len(before) == 8
    checkpoint = tmp_path / "two" / "output" / "checkpoints" / "step-000002"
    dataset = tmp_path / "two" / "dataset"

    # 2 -> 1, keeping the effective batch: accumulation 1 -> 2, the 4 batches left are 2 updates
    one = write_run(tmp_path / "one", model, "sd1x", dataset=dataset, max_train_steps=4, checkpointing_steps=4,
                    disable_validation=True, resume_from_checkpoint=str(checkpoint), resume_keep_global_batch=True)
    done = launch(one, tmp_path / "one-out", 1)
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert "made by 2 process(es), this run has 1" in log
    assert "gradient_accumulation_steps 1 -> 2" in log
    (after,) = seen(tmp_path / "one-out", 1)
    assert len(after) == 4  # 2 updates x 2 micro-batches
    after_paths = [path for batch in after for path in batch]
    assert len(set(after_paths)) == 8 and not set(after_paths) & before  # the rest of the epoch, once each
    resumed = json.loads((tmp_path / "one" / "output" / "checkpoints" / "step-000004" / "meta.json").read_text())
    assert resumed["world_size"] == 1 and resumed["epoch"] == 1
    config = json.loads((tmp_path / "one" / "output" / "checkpoints" / "step-000004" / "config.json").read_text())
    assert config["gradient_accumulation_steps"] == 2

    # 2 -> 3: the 4 batches left make one group of 3 (one left out), disjoint from those taken before
    three = write_run(tmp_path / "three", model, "sd1x", dataset=dataset, max_train_steps=3, checkpointing_steps=3,
                      disable_validation=True, resume_from_checkpoint=str(checkpoint))
    done = launch(three, tmp_path / "three-out", 3)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = seen(tmp_path / "three-out", 3)
    assert [len(rank) for rank in ranks] == [1, 1, 1]
    paths = [path for rank in ranks for batch in rank for path in batch]
    assert len(set(paths)) == 6 and not set(paths) & before

    # refused, exit 2 naming the difference: 3 processes cannot keep 2 x 1 batches per update
    kept = write_run(tmp_path / "kept", model, "sd1x", dataset=dataset, max_train_steps=3, disable_validation=True,
                     resume_from_checkpoint=str(checkpoint), resume_keep_global_batch=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(29700 + os.getpid() % 1000), "-m", "simpletuner", "train", str(kept)]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode != 0
    assert "error: resume_keep_global_batch: checkpoint step-000002" in done.stderr
    assert "3 processes cannot divide 2: use a process count that divides it" in done.stderr
    assert re.search(r"exitcode\s*:\s*2", done.stderr) and "simpletuner.errors.UserError" not in done.stderr


def test_a_checkpoint_of_another_adapter_shape_or_model_is_refused_naming_the_difference(tmp_path, tiny_model,
                                                                                          capsys):
    from simpletuner.cli import main

    model = tiny_model("sd1x")
    first = write_run(tmp_path / "first", model, "sd1x", images=8, max_train_steps=1, checkpointing_steps=1,
                      disable_validation=True)
    assert main(["train", str(first)]) == 0
    checkpoint = tmp_path / "first" / "output" / "checkpoints" / "step-000001"
    capsys.readouterr()
    other = write_run(tmp_path / "other", model, "sd1x", dataset=tmp_path / "first" / "dataset", lora_rank=8,
                      disable_validation=True, resume_from_checkpoint=str(checkpoint))
    assert main(["train", str(other)]) == 2
    err = capsys.readouterr().err
    assert "it was made by a different configuration" in err and "lora_rank: checkpoint has 4, this run 8" in err
    assert "Traceback" not in err

    another_model = tiny_model("sd1x", seed=1)  # the same family and shapes, another model
    moved = write_run(tmp_path / "moved", another_model, "sd1x", dataset=tmp_path / "first" / "dataset",
                      disable_validation=True, resume_from_checkpoint=str(checkpoint))
    assert main(["train", str(moved)]) == 2
    err = capsys.readouterr().err
    assert f"pretrained_model_name_or_path: checkpoint has {str(model)!r}, this run {str(another_model)!r}" in err
    assert not (tmp_path / "other" / "output" / "checkpoints").exists()
    assert not (tmp_path / "moved" / "output" / "checkpoints").exists()


def test_a_four_process_checkpoint_resumes_on_two_with_every_sample_of_the_epoch_once(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    # 32 images of several sizes, batch 2: 14 full batches an epoch (4 samples left over in part-filled buckets);
    # 4 processes deal 12 of them (3 steps); stop and save after 2 steps, 8 batches, mid-epoch
    first = write_run(tmp_path / "four", model, "sd1x", images=32, max_train_steps=2, checkpointing_steps=2,
                      disable_validation=True)
    done = launch(first, tmp_path / "four-out", 4)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "8 of 32 samples per epoch are left out" in done.stderr and "4 rank(s) get equal batches" in done.stderr
    before = [path for rank in seen(tmp_path / "four-out", 4) for batch in rank for path in batch]
    assert len(before) == 16 and len(set(before)) == 16  # 4 ranks x 2 steps x batch 2, none twice
    checkpoint = tmp_path / "four" / "output" / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 4

    # 4 -> 2: the 6 full batches the epoch has left are dealt 3 to each process (none left out: 6 mod 2 = 0)
    two = write_run(tmp_path / "two", model, "sd1x", dataset=tmp_path / "four" / "dataset", max_train_steps=5,
                    checkpointing_steps=5, disable_validation=True, resume_from_checkpoint=str(checkpoint))
    done = launch(two, tmp_path / "two-out", 2)
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert "made by 4 process(es), this run has 2" in log
    assert "the rest of epoch 0 (after 2 step(s) at 4 rank(s)) is re-dealt over 2 rank(s)" in log
    ranks = seen(tmp_path / "two-out", 2)
    assert [len(rank) for rank in ranks] == [3, 3]
    after = [path for rank in ranks for batch in rank for path in batch]
    assert len(set(after)) == 12 and not set(after) & set(before)  # the rest of the epoch, once each
    assert len(set(before) | set(after)) == 32 - 4  # all 14 full batches of the epoch: none skipped
    meta = json.loads((tmp_path / "two" / "output" / "checkpoints" / "step-000005" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["epoch"] == 1  # the epoch ended with the last re-dealt batch
