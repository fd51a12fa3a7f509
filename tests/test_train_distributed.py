"""A 2-process CPU run (gloo) through `accelerate launch`: identical weights, disjoint data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_run

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "two_rank_train.py"


def test_two_processes_end_with_identical_weights_having_seen_disjoint_data(tmp_path, tiny_model):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=16, max_train_steps=3, checkpointing_steps=2,
                       disable_validation=True)
    out = tmp_path / "ranks"
    out.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    seen = [{path for batch in r["seen"] for path in batch} for r in records]
    assert all(len(r["seen"]) == 3 for r in records)
    for step in range(3):  # each step, the two ranks train on different images
        assert not set(records[0]["seen"][step]) & set(records[1]["seen"][step])
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # within the epoch, no image on both ranks

    weights = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "output" / "checkpoints" / "step-000003" / "rank-00001.pt").is_file()


def test_two_processes_leave_out_the_same_failed_images(tmp_path, tiny_model):
    """Each rank encodes its own part; images that fail on either rank leave both ranks' epochs alike."""
    from bad_inputs import broken_png

    from simpletuner.demo.dataset import write_dataset

    dataset = write_dataset(tmp_path / "dataset", count=16)
    broken = [f"broken-{i}.png" for i in range(4)]  # ranks split keys by hash: usually each meets some
    for name in broken:
        broken_png(dataset / name)
        (dataset / name).with_suffix(".txt").write_text("a broken picture\n")
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=dataset, max_train_steps=4,
                       checkpointing_steps=4, disable_validation=True)
    out = tmp_path / "ranks"
    out.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    seen = {Path(path).name for r in records for batch in r["seen"] for path in batch}
    assert seen and not seen & set(broken)
    report = [json.loads(line) for line in (tmp_path / "output" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(row["path"] for row in report) == broken  # once each, whichever rank met it
    weights = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
