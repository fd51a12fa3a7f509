"""End-to-end runs of `simpletuner train` on tiny models: outputs load in diffusers, resume is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow


def _sample(pipeline, size: int, **kwargs) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline("a red circle on a blue background", num_inference_steps=2, height=size, width=size,
                    generator=generator, output_type="pt", **kwargs).images


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_lora_run_writes_a_lora_that_diffusers_loads(tmp_path: Path, tiny_model, family: str) -> None:
    from diffusers import DiffusionPipeline

    model = tiny_model(family)
    config = write_run(tmp_path, model, family, report_to="tensorboard")
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    lora = output / "pytorch_lora_weights.safetensors"
    weights = load_file(lora)
    assert weights and all(key.startswith("unet.") for key in weights)
    assert any("lora" in key for key in weights)
    size = 64 if family == "sdxl" else 32
    for step in (0, 4):  # the base model's images are kept beside the trained ones
        assert (output / "validation" / f"step-{step}" / f"validation-{size}x{size}-0.png").is_file()
    losses = metrics(output)
    assert sorted(losses) == [1, 2, 3, 4] and all(loss == loss for loss in losses.values())
    assert list((output / "logs").rglob("events.out.tfevents.*")), "TensorBoard logged nothing"

    pipeline = DiffusionPipeline.from_pretrained(model)
    if family == "sdxl":
        pipeline.watermark = None
    before = _sample(pipeline, size)
    pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    after = _sample(pipeline, size)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), "the trained LoRA did not change the model's output"


def test_full_v_prediction_run_writes_a_pipeline_folder(tmp_path: Path, tiny_model) -> None:
    from diffusers import DiffusionPipeline

    model = tiny_model("sd2x")
    config = write_run(tmp_path, model, "sd2x", model_type="full", learning_rate=1e-4)
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "output" / "pipeline"
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    original = DiffusionPipeline.from_pretrained(model)
    trained_weights = dict(pipeline.unet.named_parameters())
    changed = [name for name, p in original.unet.named_parameters() if not torch.equal(p, trained_weights[name])]
    assert changed, "full fine-tuning changed no UNet weight"
    assert torch.isfinite(_sample(pipeline, 32)).all()


def test_refiner_lora_validates_img2img(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sdxl_refiner")
    config = write_run(tmp_path, model, "sdxl_refiner", max_train_steps=2, validation_steps=2)
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "output" / "validation" / "step-2" / "validation-64x64-0.png").is_file()
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_exactly(tmp_path: Path, tiny_model) -> None:
    """2N steps straight == N steps, a checkpoint, a fresh process state, and N more steps."""
    model = tiny_model("sd1x")
    straight = write_run(tmp_path / "straight", model, "sd1x", lora_dropout=0.1, caption_dropout_probability=0.3,
                         noise_offset=0.05, disable_validation=True, max_train_steps=6, checkpointing_steps=3)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=tmp_path / "straight" / "dataset", lora_dropout=0.1,
                        caption_dropout_probability=0.3, noise_offset=0.05, disable_validation=True,
                        max_train_steps=6, checkpointing_steps=3, resume_from_checkpoint="latest")
    checkpoint = tmp_path / "straight" / "output" / "checkpoints" / "step-000003"
    shutil.copytree(checkpoint, resumed_root / "output" / "checkpoints" / "step-000003")
    assert main(["train", str(resumed)]) == 0
    second_half = metrics(resumed_root / "output")
    assert sorted(second_half) == [4, 5, 6]
    assert all(second_half[step] == full[step] for step in (4, 5, 6)), (second_half, full)
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)


def test_prefetched_run_resumes_exactly_like_an_unprefetched_one(tmp_path: Path, tiny_model) -> None:
    """Batches built ahead in a thread train exactly as batches built on demand, and the checkpoint (saved while
    the builder is ahead, here in the next epoch) resumes at the first batch not yet trained on."""
    model = tiny_model("sd1x")
    options = dict(lora_dropout=0.1, caption_dropout_probability=0.3, disable_validation=True, max_train_steps=6,
                   checkpointing_steps=3, gradient_accumulation_steps=2)
    straight = write_run(tmp_path / "straight", model, "sd1x", dataloader_prefetch=False, **options)
    assert main(["train", str(straight)]) == 0
    full = metrics(tmp_path / "straight" / "output")

    dataset = tmp_path / "straight" / "dataset"
    ahead = write_run(tmp_path / "ahead", model, "sd1x", dataset=dataset, dataloader_prefetch=True,
                      dataloader_prefetch_qlen=3, **options)
    assert main(["train", str(ahead)]) == 0
    assert metrics(tmp_path / "ahead" / "output") == full
    checkpoint = tmp_path / "ahead" / "output" / "checkpoints" / "step-000003"
    sampler = torch.load(checkpoint / "rank-00000.pt", weights_only=False)["states"]["sampler"]
    # an epoch is 5 batches (10 of the 12 images fill whole batches of 2); 3 steps took 6: epoch 1, batch 1 is
    # the next, while the builder had drawn up to 3 more
    assert (sampler["epoch"], sampler["step"]) == (1, 1)

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=dataset, dataloader_prefetch=True,
                        dataloader_prefetch_qlen=3, resume_from_checkpoint="latest", **options)
    shutil.copytree(checkpoint, resumed_root / "output" / "checkpoints" / "step-000003")
    assert main(["train", str(resumed)]) == 0
    second_half = metrics(resumed_root / "output")
    assert sorted(second_half) == [4, 5, 6]
    assert all(second_half[step] == full[step] for step in (4, 5, 6)), (second_half, full)
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    for root in (tmp_path / "ahead", resumed_root):
        final_b = load_file(root / "output" / "pytorch_lora_weights.safetensors")
        assert final_a.keys() == final_b.keys()
        assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)


def test_rerun_hits_every_cache_entry(tmp_path: Path, tiny_model, capsys) -> None:
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", max_train_steps=1, disable_validation=True)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--output_dir", str(tmp_path / "second")]) == 0
    out = capsys.readouterr().out
    assert "latents: 12 unique, 12 already cached, 0 encoded" in out
    assert "0 encoded" in out.split("text:")[1].splitlines()[0]


def test_checkpoint_rotation_keeps_the_newest(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2,
                       disable_validation=True)
    assert main(["train", str(config)]) == 0
    names = sorted(p.name for p in (tmp_path / "output" / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]
    meta = json.loads((tmp_path / "output" / "checkpoints" / "step-000005" / "meta.json").read_text())
    assert meta["step"] == 5


def test_latents_encoded_on_demand_are_stored(tmp_path: Path, tiny_model, capsys) -> None:
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, disable_validation=True,
                       vae_cache_ondemand=True)
    assert main(["train", str(config)]) == 0
    assert "latents:" not in capsys.readouterr().out  # no caching pass before training
    assert main(["cache", str(config)]) == 0
    # the 2 steps of batch 2 encoded 4 images on demand; caching now encodes only the other 8
    assert "latents: 12 unique, 4 already cached, 8 encoded" in capsys.readouterr().out


def test_lycoris_lokr_run_writes_a_file_lycoris_loads(tmp_path: Path, tiny_model) -> None:
    from diffusers import DiffusionPipeline
    from lycoris import create_lycoris_from_weights

    lycoris_config = tmp_path / "lokr.json"
    lycoris_config.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1}))
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", lora_type="lycoris", lycoris_config=str(lycoris_config),
                       init_lokr_norm=1e-3, max_train_steps=2, disable_validation=True)
    assert main(["train", str(config)]) == 0
    weights = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    assert any("lokr_w" in key for key in load_file(weights))
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lycoris" and header["simpletuner.steps"] == "2"
    assert json.loads(header["lycoris_config"])["algo"] == "lokr"
    pipeline = DiffusionPipeline.from_pretrained(model)
    before = _sample(pipeline, 32)
    network, _ = create_lycoris_from_weights(1.0, str(weights), pipeline.unet)
    network.merge_to()
    after = _sample(pipeline, 32)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def _train_in_own_process(config: Path) -> None:
    """`simpletuner train` in a fresh process (accelerate keeps one mixed precision per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "simpletuner", "train", str(config)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_adamw_bf16_trains_bf16_weights_and_resumes_exactly(tmp_path: Path, tiny_model) -> None:
    """SimpleTuner's default optimiser: the LoRA is trained and saved in bf16, and resume is exact."""
    model = tiny_model("sd1x")
    options = dict(optimizer="adamw_bf16", mixed_precision="bf16", disable_validation=True, max_train_steps=4,
                   checkpointing_steps=2)
    straight = write_run(tmp_path / "straight", model, "sd1x", **options)
    _train_in_own_process(straight)
    full = metrics(tmp_path / "straight" / "output")
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    assert final_a and {tensor.dtype for tensor in final_a.values()} == {torch.bfloat16}

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", dataset=tmp_path / "straight" / "dataset",
                        resume_from_checkpoint="latest", **options)
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    _train_in_own_process(resumed)
    second_half = metrics(resumed_root / "output")
    assert sorted(second_half) == [3, 4]
    assert all(second_half[step] == full[step] for step in (3, 4)), (second_half, full)
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
