"""Sharded training on 2 CPU processes over gloo (FSDP2 through accelerate), against the plain 2-process run."""

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
FULL = {"model_type": "full", "learning_rate": 1e-4, "images": 8, "max_train_steps": 4, "checkpointing_steps": 2,
        "disable_validation": True, "checkpoints_total_limit": 5}


def launch(config: Path) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "simpletuner",
               "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]


def exported(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "output" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def losses(root: Path) -> dict[int, float]:
    lines = (root / "output" / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}
