"""Sharded training on 2 CPU processes over gloo (FSDP2 and DeepSpeed ZeRO through accelerate), against the plain
2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import write_run

pytestmark = pytest.mark.slow
FULL = {"model_type": "full", "learning_rate": 1e-4, "images": 8, "max_train_steps": 4, "checkpointing_steps": 2,
        "disable_validation": True, "checkpoints_total_limit": 5}


def launch(config: Path, processes: int = 2, cuda: bool = False) -> None:
    multi = ["--multi_gpu"] if processes > 1 else []
    command = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "simpletuner",
               "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if cuda else {**os.environ, "OMP_NUM_THREADS": "1",
                                                                  "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]


def exported(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "output" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def losses(root: Path) -> dict[int, float]:
    lines = (root / "output" / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def run(root: Path, model: Path, processes: int = 2, cuda: bool = False, **options) -> Path:
    launch(write_run(root, model, "sd1x", **{**FULL, **options}), processes, cuda)
    return root


def assert_resumes_exactly(tmp_path: Path, model: Path, uninterrupted: Path, **options) -> None:
    """A run resumed from the uninterrupted run's step-2 checkpoint ends bit-identical to it."""
    checkpoint = uninterrupted / "output" / "checkpoints" / "step-000002"
    resumed = run(tmp_path / f"resumed-{uninterrupted.name}", model, resume_from_checkpoint=str(checkpoint),
                  dataset=uninterrupted / "dataset", **options)
    assert {step: loss for step, loss in losses(uninterrupted).items() if step > 2} == losses(resumed)
    before, after = exported(uninterrupted), exported(resumed)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def validation_images(root: Path, step: int) -> dict[str, np.ndarray]:
    folder = root / "output" / "validation" / f"step-{step}"
    return {path.name: np.asarray(Image.open(path), dtype=np.int16) for path in sorted(folder.glob("*.png"))}


def test_fsdp2_sharded_state_matches_the_unsharded_run_and_resumes_exactly(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    validating = {"disable_validation": False, "validation_steps": 4, "use_ema": True, "ema_decay": 0.9}
    plain = run(tmp_path / "plain", model, **validating)
    sharded = run(tmp_path / "fsdp", model, fsdp_enable=True, **validating)  # SHARDED_STATE_DICT, block wrapping

    # each process averages its shard; the checkpoint holds the EMA whole, as the unsharded run's
    for step in ("step-000002", "step-000004"):
        expected_ema, got_ema = (torch.load(root / "output" / "checkpoints" / step / "ema.pt", weights_only=True)
                                 for root in (plain, sharded))
        assert got_ema["updates"] == expected_ema["updates"] == int(step[-1])
        assert len(got_ema["shadow"]) == len(expected_ema["shadow"])
        for got_shadow, expected_shadow in zip(got_ema["shadow"], expected_ema["shadow"]):
            torch.testing.assert_close(got_shadow, expected_shadow, rtol=1e-4, atol=1e-5)

    # validation samples the whole weights gathered to the first process: the base model's images are the plain
    # run's, the trained model's differ by at most a level or two of 255 (its weights differ as said below)
    for step, tolerance in ((0, 0), (4, 2)):
        expected_images, got_images = validation_images(plain, step), validation_images(sharded, step)
        assert got_images and got_images.keys() == expected_images.keys()
        for name, image in got_images.items():
            assert np.abs(image - expected_images[name]).max() <= tolerance, (step, name)

    checkpoint = sharded / "output" / "checkpoints" / "step-000002"
    assert (checkpoint / "fsdp" / ".metadata").is_file() and not (checkpoint / "trained.safetensors").exists()
    assert not (checkpoint / "optimizer.pt").exists()  # the optimiser state is in the shards
    expected, got = exported(plain), exported(sharded)
    assert expected.keys() == got.keys()
    moved = [name for name in expected if not torch.equal(expected[name], load_file(
        Path(model) / "unet" / "diffusion_pytorch_model.safetensors")[name])]
    assert moved  # the full fine-tune changed the weights (both exports are the EMA's)
    # fp32 sums in another order (reduce-scatter of shards vs one flat all-reduce); Adam divides by the root of
    # the second moment, so where a gradient is near zero its last bits move the weight by up to the learning
    # rate (1e-4): allow a tenth of that
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    for step, loss in losses(plain).items():
        assert losses(sharded)[step] == pytest.approx(loss, rel=1e-5)
    assert_resumes_exactly(tmp_path, model, sharded, fsdp_enable=True, **validating)


def test_fsdp2_full_state_dict_gathers_to_one_file_and_resumes_exactly(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    options = {"fsdp_enable": True, "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
               "fsdp_reshard_after_forward": False}
    full = run(tmp_path / "full", model, **options)

    checkpoint = full / "output" / "checkpoints" / "step-000004"
    weights = load_file(checkpoint / "trained.safetensors")
    final = exported(full)
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[name], final[name]) for name in final)  # whole, not one process's shard
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(final)  # keyed by parameter name, every parameter whole
    assert all(state["exp_avg"].shape == final[name].shape for name, state in optimizer["state"].items())
    assert_resumes_exactly(tmp_path, model, full, **options)


def test_deepspeed_zero2_with_offload_and_accumulation_matches_the_plain_run_and_resumes_exactly(tmp_path,
                                                                                                   tiny_model):
    """ZeRO-2 on 2 CPU processes over gloo (DeepSpeed's CPU accelerator), optimiser state offloaded to the CPU,
    2 micro-batches per update, EMA (whole weights on every process at stage 2). Its first run JIT-compiles DeepSpeed's shared-memory op into
    TORCH_EXTENSIONS_DIR (about 2 minutes on 2 cores; seconds once cached)."""
    pytest.importorskip("deepspeed")
    model = tiny_model("sd1x")
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    common = {"gradient_accumulation_steps": 2, "images": 12, "use_ema": True, "ema_decay": 0.9}
    options = {"deepspeed_config": json.dumps({"zero_optimization": zero}), **common}
    plain = run(tmp_path / "plain", model, **common)
    trained = run(tmp_path / "zero2", model, **options)

    checkpoint = trained / "output" / "checkpoints" / "step-000002"
    partitions = {path.name for path in (checkpoint / "deepspeed").iterdir()}
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= partitions  # one per process
    assert torch.load(checkpoint / "ema.pt", weights_only=True)["updates"] == 2
    expected, got = exported(plain), exported(trained)
    assert expected.keys() == got.keys()
    before = load_file(Path(model) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[name], got[name]) for name in got)  # the full fine-tune moved the weights
    # the same updates in fp32, gradients summed in another order (as for FSDP2 above)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    for step, loss in losses(plain).items():
        assert losses(trained)[step] == pytest.approx(loss, rel=1e-5)
    assert_resumes_exactly(tmp_path, model, trained, **options)


ON_CUDA = pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="ZeRO-3 on CUDA processes needs a GPU")])


@pytest.mark.parametrize("cuda", [False, ON_CUDA], ids=["cpu", "cuda"])
def test_deepspeed_zero3_matches_the_plain_run_and_resumes_exactly(tmp_path, tiny_model, cuda):
    """ZeRO-3 (weights partitioned too) on 2 processes, CPU processes over gloo or CUDA ones, with EMA: each
    process averages its partition of the weights, saved with its rank; the export holds the averaged weights."""
    pytest.importorskip("deepspeed")
    model = tiny_model("sd1x")
    processes = min(2, torch.cuda.device_count()) if cuda else 2
    ema = {"use_ema": True, "ema_decay": 0.9}
    options = {"deepspeed_config": json.dumps({"zero_optimization": {"stage": 3}}), "processes": processes,
               "cuda": cuda, **ema}
    trained = run(tmp_path / "zero3", model, **options)

    checkpoint = trained / "output" / "checkpoints" / "step-000002"
    assert (checkpoint / "deepspeed").is_dir() and not (checkpoint / "ema.pt").exists()
    for rank in range(processes):  # each process's partition of the average
        assert torch.load(checkpoint / f"rank-{rank:05d}.pt", weights_only=False)["states"]["ema"]["updates"] == 2
    before = load_file(Path(model) / "unet" / "diffusion_pytorch_model.safetensors")
    got = exported(trained)
    assert any(not torch.equal(before[name], tensor) for name, tensor in got.items())
    if not cuda:  # the same updates and average as the plain 2-process run, gradients summed in another order
        plain = run(tmp_path / "plain", model, **ema)
        expected = exported(plain)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
        for step, loss in losses(plain).items():
            assert losses(trained)[step] == pytest.approx(loss, rel=1e-5)
    assert_resumes_exactly(tmp_path, model, trained, **options)
