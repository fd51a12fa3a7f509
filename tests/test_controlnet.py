"""ControlNet training (controlnet=true) on SD 1.x and SDXL: the loss against a plain diffusers ControlNet step,
conditioning datasets paired by path, `simpletuner train` end to end (full and LoRA), export into diffusers'
ControlNet pipelines, exact resume, and bad input (exit 2 with the names)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from bad_inputs import broken_png
from train_helpers import metrics, write_run

import simpletuner
from simpletuner.cli import main
from simpletuner.config.schema import TrainingConfig
from simpletuner.demo.dataset import write_dataset
from simpletuner.models.base import DTypePolicy
from simpletuner.models.controlnet import attach_controlnet
from simpletuner.models.registry import get_family
from simpletuner.models.objectives import NoiseDraw, training_loss

CAPTIONS = ["a red cat on a mat", "", "an astronaut riding a horse"]


# ---------------------------------------------------------------- parity with diffusers' train_controlnet.py
@pytest.mark.parametrize("kind", ["sd1x", "sd2x", "sdxl"])
def test_loss_parity_with_a_plain_diffusers_controlnet_step(tiny_model, kind):
    from diffusers import ControlNetModel, DDPMScheduler

    cfg = TrainingConfig(model_family=kind, pretrained_model_name_or_path=str(tiny_model(kind)), controlnet=True)
    family = get_family(kind)
    components = family.load(cfg, DTypePolicy())
    controlnet = attach_controlnet(family, components, cfg)
    with torch.no_grad():  # a ControlNet whose zero convolutions are no longer zero, so it steers the UNet
        for name, parameter in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    size = 64 if kind == "sdxl" else 32
    generator = torch.Generator().manual_seed(3)
    control_u8 = torch.randint(0, 256, (3, 3, size, size), generator=generator, dtype=torch.uint8)
    latents = torch.randn(3, 4, *(s // family.vae_scale_factor(components) for s in (size, size)), generator=generator)
    text = family.text_outputs(components, CAPTIONS)
    batch = {"latents": latents, "text": text, "control": control_u8}
    if kind == "sdxl":
        batch.update(original_size=torch.tensor([[float(size), float(size)]] * 3), crop_top_left=torch.zeros(3, 2),
                     target_size=torch.tensor([[float(size), float(size)]] * 3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    draw = NoiseDraw(noise=noise, timesteps=torch.tensor([17, 999, 500]))
    with torch.no_grad():
        ours = training_loss(family, components, family.objective(cfg, components), batch, draw)
        # the step of diffusers' examples/controlnet/train_controlnet(_sdxl).py
        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        noisy = noise_scheduler.add_noise(latents, noise, draw.timesteps)
        controlnet_image = control_u8.float() / 255.0  # transforms.ToTensor()
        added = None
        if kind == "sdxl":
            added = {"text_embeds": text["pooled_prompt_embeds"],
                     "time_ids": torch.tensor([[float(size), size, 0, 0, size, size]] * 3)}
        reference_net = ControlNetModel.from_config(controlnet.config)
        reference_net.load_state_dict(controlnet.state_dict())
        down, mid = reference_net(noisy, draw.timesteps, encoder_hidden_states=text["prompt_embeds"],
                                  controlnet_cond=controlnet_image, return_dict=False,
                                  **({"added_cond_kwargs": added} if added else {}))
        model_pred = components["unet"](noisy, draw.timesteps, encoder_hidden_states=text["prompt_embeds"],
                                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                        return_dict=False, **({"added_cond_kwargs": added} if added else {}))[0]
        target = noise_scheduler.get_velocity(latents, noise, draw.timesteps) \
            if noise_scheduler.config.prediction_type == "v_prediction" else noise
        reference = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        plain = family.predict(components, noisy, draw.timesteps, text, batch)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, model_pred), "the ControlNet did not change the prediction"


# ---------------------------------------------------------------- end to end
def edges_of(dataset: Path, target: Path, skip: int = 0) -> Path:
    """Control images (edge maps) beside nothing of the source: one per image, the first `skip` left out."""
    target.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(sorted(dataset.glob("*.png"))):
        if index < skip:
            continue
        ImageOps.grayscale(Image.open(path)).filter(ImageFilter.FIND_EDGES).convert("RGB").save(target / path.name)
    return target


def controlnet_run(root: Path, model: Path, family: str, *, skip: int = 0, **options) -> Path:
    dataset = write_dataset(root / "dataset", count=8)
    edges = edges_of(dataset, root / "edges", skip)
    config = write_run(root, model, family, dataset=dataset, controlnet=True, train_batch_size=2, **options)
    backends = json.loads((root / "multidatabackend.json").read_text())
    backends[0]["conditioning_data"] = "edges"
    backends.insert(1, {"id": "edges", "dataset_type": "conditioning", "conditioning_type": "controlnet",
                        "instance_data_dir": str(edges), "caption_strategy": "instanceprompt",
                        "instance_prompt": "edges", "resolution": backends[0]["resolution"],
                        "resolution_type": "pixel_area"})
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


def _sample(pipeline, control: Image.Image, size: int) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("a red circle", image=control, width=size, height=size, num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_sd1x_full_controlnet_trains_exports_and_steers_the_pipeline(tmp_path, tiny_model):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", model_type="full", max_train_steps=2,
                            checkpointing_steps=2, validation_steps=2, learning_rate=1e-3)
    assert main(["config", "check", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    assert sorted(metrics(output)) == [1, 2]
    validation = output / "validation" / "step-2"
    assert list(validation.glob("*-control.png")) and list(validation.glob("*-0.png"))
    controlnet = ControlNetModel.from_pretrained(output / "controlnet")
    base = StableDiffusionPipeline.from_pretrained(tiny_model("sd1x"))
    # the base UNet stayed frozen: the ControlNet is all that trained
    untouched = ControlNetModel.from_unet(base.unet)
    trained = dict(controlnet.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in untouched.named_parameters() if "controlnet_" not in k)
    pipeline = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    edges = sorted((tmp_path / "edges").glob("*.png"))
    one, other = Image.open(edges[0]).resize((32, 32)), Image.open(edges[1]).resize((32, 32))
    first, second = _sample(pipeline, one, 32), _sample(pipeline, other, 32)
    assert np.isfinite(first).all() and not np.array_equal(first, second), "the control image changed nothing"


@pytest.mark.slow
def test_sdxl_controlnet_lora_exports_a_loadable_lora_and_a_fused_controlnet(tmp_path, tiny_model):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    config = controlnet_run(tmp_path, tiny_model("sdxl"), "sdxl", model_type="lora", max_train_steps=2,
                            checkpointing_steps=2, validation_steps=2, learning_rate=1e-2)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    lora = output / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("controlnet.") and ".lora_" in key for key in keys)
    assert (output / "checkpoints").exists() or any(output.glob("checkpoint*"))
    assert not (output / ".tmp-export").exists()  # the staged export moved into place
    card = (output / "README.md").read_text()
    assert "This is a ControlNet of" in card and "StableDiffusionXLControlNetPipeline.from_pretrained(" in card
    assert "ControlNetModel.from_pretrained(" in card and "subfolder='controlnet'" in card
    assert "load_lora_adapter" in card and "LoraLoader" not in card  # no UI LoRA file for a ControlNet
    fused = ControlNetModel.from_pretrained(output / "controlnet")
    base = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    adapted = ControlNetModel.from_pretrained(output / "controlnet_base")
    adapted.load_lora_adapter(str(lora), prefix="controlnet")
    pipeline = StableDiffusionXLControlNetPipeline(**base.components, controlnet=adapted)
    pipeline_fused = StableDiffusionXLControlNetPipeline(**base.components, controlnet=fused)
    control = Image.open(sorted((tmp_path / "edges").glob("*.png"))[0]).resize((64, 64))
    with torch.no_grad():
        from_lora, from_fused = _sample(pipeline, control, 64), _sample(pipeline_fused, control, 64)
    np.testing.assert_allclose(from_lora, from_fused, atol=1e-4)
    other = Image.open(sorted((tmp_path / "edges").glob("*.png"))[3]).resize((64, 64))
    assert not np.array_equal(from_fused, _sample(pipeline_fused, other, 64)), "the control image changed nothing"


@pytest.mark.slow
def test_resume_with_a_conditioning_dataset_is_exact(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    whole = controlnet_run(tmp_path / "whole", model, "sd1x", model_type="lora", max_train_steps=4,
                           checkpointing_steps=2, validation_steps=100, disable_validation=True)
    assert main(["train", str(whole)]) == 0
    parts = controlnet_run(tmp_path / "parts", model, "sd1x", model_type="lora", max_train_steps=2,
                           checkpointing_steps=2, validation_steps=100, disable_validation=True)
    assert main(["train", str(parts)]) == 0
    assert main(["train", str(parts), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    expected, resumed = metrics(tmp_path / "whole" / "output"), metrics(tmp_path / "parts" / "output")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.slow
def test_an_image_without_a_control_image_is_a_counted_skip(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", skip=2, max_train_steps=1, disable_validation=True)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 no conditioning image (e.g. 0000.png (no 0000.* in 'edges'); 0001.png" in out, out
    assert "shapes <-> edges (conditioning): 6 pairs" in out


def test_an_image_whose_control_image_fails_to_load_is_left_out_and_reported(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, disable_validation=True)
    broken = sorted((tmp_path / "edges").glob("*.png"))[0]
    broken_png(broken, Image.open(broken).size)  # a valid header (the scan pairs it), pixels that cannot load
    assert main(["train", str(config)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    report = [json.loads(line) for line in (tmp_path / "output" / "skipped.jsonl").read_text().splitlines()]
    assert [(row["path"], row["stage"]) for row in report] == [(broken.name, "cache")], report
    assert report[0]["reason"].startswith("control image: ")


def test_corrupt_control_entries_are_read_through_the_checks_and_encoded_again(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1, disable_validation=True)
    assert main(["train", str(config)]) == 0
    shards = [path for path in (tmp_path / "cache").rglob("*.shard") if "edges" in str(path)]
    assert shards
    for shard in shards:
        data = bytearray(shard.read_bytes())
        for position in range(200, len(data), 256):
            data[position] ^= 0xFF
        shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "encoding it again" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["pixart_sigma", "kolors", "deepfloyd"])
def test_controlnet_on_a_family_without_one_exits_2_naming_it(tmp_path, tiny_model, capsys, family):
    # refused before the model loads: any model folder will do
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", model_family=family, max_train_steps=1,
                            resolution=64, validation_resolution="64")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model_family {family!r} has no ControlNet training in this version" in err
    assert "takes flux, hunyuan_dit, legacy, sd1x, sd2x, sd3, sdxl" in err
    assert not (tmp_path / "output" / "checkpoints").exists()


def test_config_check_knows_the_families_with_a_controlnet():
    from simpletuner.config.schema import CONTROLNET_FAMILIES
    from simpletuner.models.registry import family_names

    assert CONTROLNET_FAMILIES == tuple(name for name in family_names() if get_family(name).controlnet_loader)


@pytest.mark.parametrize(("option", "says"), [
    ({"train_text_encoder": True}, "train_text_encoder=true: the ControlNet export holds the ControlNet only"),
])
def test_controlnet_with_what_it_cannot_keep_exits_2_naming_the_option(tmp_path, tiny_model, capsys, option, says):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", model_type="lora", max_train_steps=1, **option)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert says in err
    assert "Traceback" not in err
    assert not (tmp_path / "output" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_a_controlnet_trains_in_full_precision_on_a_quantised_frozen_base(tmp_path, tiny_model, model_type):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from optimum.quanto import QLinear

    from simpletuner.config.load import load_settings
    from simpletuner.train.setup import build_run, make_accelerator

    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", model_type=model_type, max_train_steps=2,
                            checkpointing_steps=2, validation_steps=2, learning_rate=1e-2,
                            base_model_precision="int8-quanto")
    settings = load_settings(str(config))
    run = build_run(settings, make_accelerator(settings))
    unet, controlnet = run.components["unet"], run.components["controlnet"]
    assert any(isinstance(module, QLinear) for module in unet.modules())  # the frozen base is quantised
    assert not any(isinstance(module, QLinear) for module in controlnet.modules())
    assert all(not p.requires_grad for p in unet.parameters())
    trained = [p for p in controlnet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    # the ControlNet copied the base's full-precision weights, not the quantised ones
    base = UNet2DConditionModel.from_pretrained(tiny_model("sd1x"), subfolder="unet")
    copied = controlnet.get_base_model() if hasattr(controlnet, "get_base_model") else controlnet
    reference = ControlNetModel.from_unet(base)
    expected = dict(reference.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"]
    actual = {name.replace(".base_layer", ""): p for name, p in copied.named_parameters()}
    torch.testing.assert_close(actual["down_blocks.0.attentions.0.proj_in.weight"], expected, rtol=0, atol=0)
    del run
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    assert sorted(metrics(output)) == [1, 2]
    assert list((output / "validation" / "step-2").glob("*-control.png"))
    exported = ControlNetModel.from_pretrained(output / "controlnet")
    assert all(p.dtype == torch.float32 for p in exported.parameters())


def _tensorboard_images(output: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [path.parent for path in (output / "logs").rglob("events.out.tfevents.*")]
    images: dict[str, list] = {}
    for run in runs:
        events = EventAccumulator(str(run), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            images.setdefault(tag, []).extend(events.Images(tag))
    return images


@pytest.mark.slow
def test_num_eval_images_samples_from_control_images_of_the_conditioning_dataset(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, validation_steps=2,
                            num_eval_images=2, validation_resolution="48x48", report_to="tensorboard")
    assert main(["train", str(config)]) == 0  # 48x48 is no trained size: the control images' own sizes are used
    output = tmp_path / "output"
    folder = output / "validation" / "step-2"
    edges = sorted((tmp_path / "edges").glob("*.png"))[:2]  # the first pairs by path
    for edge in edges:
        controls = list(folder.glob(f"validation-*-{edge.stem}-control.png"))
        assert len(controls) == 1, sorted(p.name for p in folder.iterdir())
        result = controls[0].with_name(controls[0].name.replace("-control.png", "-0.png"))
        assert result.is_file() and Image.open(result).size == Image.open(controls[0]).size
        # the control image as trained: the edge file resized and cropped to its image's bucket
        width, height = Image.open(controls[0]).size
        assert controls[0].name.startswith(f"validation-{width}x{height}-")
    assert len(list(folder.glob("*-control.png"))) == 2
    grids = _tensorboard_images(output)["validation/validation-grid/0"]
    sizes = [Image.open(path).size for path in sorted(folder.glob("*-control.png"))]
    cell = (max(w for w, _ in sizes), max(h for _, h in sizes))
    assert {(grid.step, grid.width, grid.height) for grid in grids} >= {(2, cell[0] * 2, cell[1] * 2)}


@pytest.mark.slow
def test_validation_conditioning_images_are_sampled_at_each_validation_size(tmp_path, tiny_model, capsys):
    edge = tmp_path / "my edges.png"
    Image.new("RGB", (50, 30), "white").save(edge)
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, validation_steps=2,
                            validation_conditioning_images=[str(edge)], validation_resolution="32x32,40x24")
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "output" / "validation" / "step-2"
    for size in ((32, 32), (40, 24)):
        stem = f"validation-{size[0]}x{size[1]}-my_edges"
        assert Image.open(folder / f"{stem}-control.png").size == size
        assert Image.open(folder / f"{stem}-0.png").size == size
    missing = tmp_path / "none.png"
    options = json.loads(config.read_text())
    config.write_text(json.dumps({**options, "validation_conditioning_images": [str(missing)]}))
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"validation_conditioning_images: {missing} cannot be read as an image" in err
    assert "Traceback" not in err


def test_an_image_dataset_without_a_conditioning_dataset_exits_2(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=4, controlnet=True, max_train_steps=1)
    assert main(["train", str(config)]) == 2
    assert "'shapes'" in capsys.readouterr().err


def test_pairs_whose_aspect_ratios_differ_exit_2_naming_them(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1)
    name = sorted((tmp_path / "edges").glob("*.png"))[0]
    Image.open(name).resize((64, 16)).save(name)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert name.name in err and "aspect" in err


def test_the_source_folders_are_not_written_and_latents_on_demand_train(tmp_path, tiny_model):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, disable_validation=True,
                            vae_cache_ondemand=True)
    before = {p: p.stat().st_mtime_ns for folder in ("dataset", "edges") for p in (tmp_path / folder).rglob("*")}
    assert main(["train", str(config)]) == 0
    after = {p: p.stat().st_mtime_ns for folder in ("dataset", "edges") for p in (tmp_path / folder).rglob("*")}
    assert before == after


# ---------------------------------------------------------------- conditioning generators
@pytest.mark.slow
def test_canny_generator_makes_control_images_in_the_cache_and_trains(tmp_path, tiny_model, capsys):
    import cv2

    dataset = write_dataset(tmp_path / "dataset", count=6)
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=dataset, controlnet=True, model_type="lora",
                       max_train_steps=2, disable_validation=True)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0]["conditioning"] = {"type": "canny", "conditioning_type": "controlnet", "captions": ["x"]}
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    before = sorted(p.name for p in dataset.iterdir())
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "cache" / "conditioning" / "shapes" / "canny-100-200"
    assert f"conditioning 'shapes_conditioning_canny': 6 generated, 0 kept, in {folder}" in out
    assert "shapes <-> shapes_conditioning_canny (conditioning): 6 pairs" in out
    assert sorted(p.name for p in dataset.iterdir()) == before  # nothing written beside the sources
    source = np.asarray(Image.open(dataset / "0000.png").convert("L"))
    expected = cv2.Canny(source, 100, 200)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "0000.png"))[..., 0], expected)
    assert expected.any()
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 0
    assert "0 generated, 6 kept" in capsys.readouterr().out


def _remote_canny_run(tmp_path: Path, model: Path, entry: dict) -> tuple[Path, Path]:
    """A ControlNet run whose image dataset is `entry` with a canny generator; returns (config, generated folder)."""
    config = write_run(tmp_path, model, "sd1x", images=6, controlnet=True, max_train_steps=2,
                       disable_validation=True)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0] = {"id": "shapes", "resolution": 32, "resolution_type": "pixel_area", **entry,
                   "conditioning": {"type": "canny", "conditioning_type": "controlnet", "captions": ["x"]}}
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    return config, tmp_path / "cache" / "conditioning" / "shapes" / "canny-100-200"


def _canny_of(png: bytes) -> np.ndarray:
    import io

    import cv2

    return cv2.Canny(np.asarray(Image.open(io.BytesIO(png)).convert("L")), 100, 200)


@pytest.mark.slow
def test_canny_generator_reads_an_s3_dataset_and_writes_into_the_cache(tmp_path, tiny_model, capsys, s3_server):
    pytest.importorskip("cv2")
    dataset = write_dataset(tmp_path / "pngs", count=6)
    s3_server.make_bucket("canny-source")
    files = {f"photos/{p.name}": p.read_bytes() for p in sorted(dataset.iterdir())}
    s3_server.put("canny-source", files)
    config, folder = _remote_canny_run(tmp_path, tiny_model("sd1x"), {
        **s3_server.dataset_fields("canny-source", "photos"), "caption_strategy": "textfile"})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"conditioning 'shapes_conditioning_canny': 6 generated, 0 kept, in {folder}" in out
    assert "shapes <-> shapes_conditioning_canny (conditioning): 6 pairs" in out
    assert sorted(metrics(tmp_path / "output")) == [1, 2]
    expected = _canny_of(files["photos/0000.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "0000.png"))[..., 0], expected)
    assert expected.any()
    listed = sorted(s3_server.filesystem().find("canny-source"))
    assert listed == sorted(f"canny-source/{key}" for key in files)  # nothing written beside the sources
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 0
    assert "0 generated, 6 kept" in capsys.readouterr().out


@pytest.mark.slow
def test_canny_generator_reads_a_saved_hugging_face_dataset_and_writes_into_the_cache(tmp_path, tiny_model,
                                                                                       capsys):
    pytest.importorskip("cv2")
    datasets = pytest.importorskip("datasets")
    pngs = sorted(write_dataset(tmp_path / "pngs", count=6).glob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def save(folder: Path, images: list[bytes]) -> None:
        datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in images],
                                    "text": [f"shape {i}" for i in range(len(images))]},
                                   features=features).save_to_disk(str(folder))

    images = [p.read_bytes() for p in pngs]
    save(tmp_path / "hf", images)
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    config, folder = _remote_canny_run(tmp_path, tiny_model("sd1x"), {
        "type": "huggingface", "dataset_name": str(tmp_path / "hf"), "caption_column": "text"})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "6 generated, 0 kept" in out and "(conditioning): 6 pairs" in out
    assert sorted(p.name for p in folder.glob("*.png")) == [f"row-{i:06d}.png" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "row-000002.png"))[..., 0], _canny_of(images[2]))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 0
    assert "0 generated, 6 kept" in capsys.readouterr().out
    # another dataset under the same name (a new fingerprint): its control images are made again
    shutil.rmtree(tmp_path / "hf")
    save(tmp_path / "hf", images[::-1])
    assert main(["train", str(config), "--output_dir", str(tmp_path / "third")]) == 0
    assert "6 generated, 0 kept" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "row-000002.png"))[..., 0], _canny_of(images[3]))


def test_a_generator_without_controlnet_exits_2(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=4, max_train_steps=1)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0]["conditioning"] = [{"type": "canny"}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    assert main(["config", "check", str(config)]) == 2  # `config check` sees it too
    assert "dataset 'shapes': conditioning generators make ControlNet inputs" in capsys.readouterr().err
    assert main(["train", str(config)]) == 2
    assert "dataset 'shapes': conditioning generators make ControlNet inputs" in capsys.readouterr().err
    assert main(["config", "check", str(config), "--controlnet", "true", "--cache_dir", "s3://bucket/cache"]) == 2
    assert "conditioning generators write their control images under a local cache_dir" in capsys.readouterr().err
    backends[0]["conditioning"] = [{"type": "depth"}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    assert main(["train", str(config), "--controlnet", "true"]) == 2
    assert "canny" in capsys.readouterr().err


# ---------------------------------------------------------------- SimpleTuner's example
EXAMPLES = Path(__file__).parent / "data" / "upstream_examples"


def _saved_minecraft(tmp_path: Path) -> Path:
    """A Hugging Face dataset saved on this machine, standing in for the examples' keras-dreambooth/minercraft."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "minecraft"
    if folder.is_dir():
        return folder
    pngs = sorted(write_dataset(tmp_path / "minecraft-pngs", count=6).glob("*.png"))
    datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in pngs]},
                               features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(folder))
    return folder


def _local_backends(tmp_path: Path, name: str, **changes) -> Path:
    """The example's dataset file with its Hugging Face dataset replaced by one saved here (same type, same
    canny generator); `changes` size it for a tiny model."""
    backends = json.loads((EXAMPLES / name).read_text())
    backends[0].update(dataset_name=str(_saved_minecraft(tmp_path)), **changes)
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(backends))
    return path


# example -> (its model_family, its dataset file, the tiny model's resolution, options the tiny model needs)
CONTROLNET_EXAMPLES = {
    "sdxl.peft-controlnet-lora": ("sdxl", "multidatabackend-controlnet-1024px.json", 64, []),
    "sd3.peft-controlnet-lora": ("sd3", "multidatabackend-controlnet-1024px.json", 32, []),
    "flux.peft-controlnet-lora": ("flux", "multidatabackend-controlnet-128px.json", 32,
                                  ["--tokenizer_max_length", "32"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTROLNET_EXAMPLES))
def test_simpletuner_controlnet_lora_examples_check_and_train_with_local_data(tmp_path, tiny_model, monkeypatch,
                                                                              name):
    pytest.importorskip("cv2")
    monkeypatch.chdir(tmp_path)  # its cache paths are relative
    family, backends, size, extra = CONTROLNET_EXAMPLES[name]
    config = str(EXAMPLES / name / "config.json")
    assert main(["config", "check", config, "--data_backend_config", str(_local_backends(tmp_path, backends))]) == 0
    tiny = _local_backends(tmp_path, backends, resolution=size, maximum_image_size=size,
                           target_downsample_size=size, minimum_image_size=0)
    # its own process: the example's bf16 mixed precision needs a fresh accelerate state
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(simpletuner.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "simpletuner", "train", config, "--data_backend_config", str(tiny),
                             "--pretrained_model_name_or_path", str(tiny_model(family)), "--resolution", str(size),
                             "--validation_resolution", f"{size}x{size}", "--validation_num_inference_steps", "2",
                             "--validation_steps", "2", "--max_train_steps", "2", "--lora_rank", "4", *extra,
                             "--output_dir", str(tmp_path / "output")], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "output"
    assert sorted(metrics(output)) == [1, 2]
    assert (output / "controlnet" / "config.json").is_file() and (output / "pytorch_lora_weights.safetensors").is_file()
    assert list((output / "validation" / "step-2").glob("*-control.png"))
    dataset_id = json.loads((EXAMPLES / backends).read_text())[0]["id"]
    assert len(list((tmp_path / "cache" / "conditioning" / dataset_id).glob("canny-*/row-*.png"))) == 6
    if family == "flux":  # flux_lora_target 'controlnet': adapters on the ControlNet's control layers only
        from safetensors import safe_open

        with safe_open(str(output / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
        control = ("controlnet.controlnet_x_embedder.", "controlnet.controlnet_blocks.",
                   "controlnet.controlnet_single_blocks.")
        assert keys and all(key.startswith(control) for key in keys), keys[:5]


# ---------------------------------------------------------------- ComfyUI
@pytest.mark.parametrize("kind", ["sd1x", "sdxl"])
def test_comfyui_maps_every_key_of_the_exported_controlnet(tmp_path, tiny_model, kind):
    from comfy_controlnet_keys import comfy_controlnet_keys, unet_config_of
    from safetensors.torch import load_file

    from simpletuner.publish.export import export_controlnet
    from simpletuner.train.adapters import Trained

    cfg = TrainingConfig(model_family=kind, pretrained_model_name_or_path=str(tiny_model(kind)), controlnet=True)
    family = get_family(kind)
    controlnet = attach_controlnet(family, family.load(cfg, DTypePolicy()), cfg)
    export_controlnet(Trained("full", controlnet, controlnet), tmp_path, {})
    state = load_file(str(tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((tmp_path / "controlnet" / "config.json").read_text())
    mapped, leftover = comfy_controlnet_keys(state, unet_config_of(config))
    assert leftover == [] and len(mapped) == len(state)
    assert len(set(mapped.values())) == len(mapped)  # no two weights land on one ComfyUI key
    assert mapped["controlnet_cond_embedding.conv_out.weight"].startswith("input_hint_block.")
    assert any(key.startswith("label_emb.") for key in mapped.values()) == (kind == "sdxl")


@pytest.mark.parametrize(("kind", "branch"), [("sd3", "mmdit"), ("flux", "flux_instantx")])
def test_comfyui_loads_every_parameter_of_the_exported_sd3_and_flux_controlnets(tmp_path, tiny_model, kind, branch):
    from comfy_controlnet_keys import comfy_transformer_controlnet_keys
    from safetensors.torch import load_file

    from simpletuner.publish.export import export_controlnet
    from simpletuner.train.adapters import Trained

    cfg = TrainingConfig(model_family=kind, pretrained_model_name_or_path=str(tiny_model(kind)), controlnet=True)
    family = get_family(kind)
    controlnet = attach_controlnet(family, family.load(cfg, DTypePolicy()), cfg)
    export_controlnet(Trained("full", controlnet, controlnet), tmp_path, {})
    state = load_file(str(tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert comfy_transformer_controlnet_keys(state) == (branch, [], [])
    # the check sees a lost weight: without a block's projection ComfyUI leaves its parameter uninitialised
    lost = next(key for key in state if key.endswith("attn.to_out.0.weight"))
    found, missing, _ = comfy_transformer_controlnet_keys({k: v for k, v in state.items() if k != lost})
    assert found == branch and len(missing) == 1 and missing[0].endswith(".weight")


def test_comfyui_cannot_load_the_hunyuan_dit_controlnet_file_as_status_says(tmp_path, tiny_model):
    from comfy_controlnet_keys import comfy_controlnet_loader
    from safetensors.torch import load_file

    from simpletuner.publish.export import export_controlnet
    from simpletuner.train.adapters import Trained

    cfg = TrainingConfig(model_family="hunyuan_dit", pretrained_model_name_or_path=str(tiny_model("hunyuan_dit")),
                         controlnet=True)
    family = get_family("hunyuan_dit")
    controlnet = attach_controlnet(family, family.load(cfg, DTypePolicy()), cfg)
    export_controlnet(Trained("full", controlnet, controlnet), tmp_path, {})
    state = load_file(str(tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert "after_proj_list.18.bias" not in state  # not Tencent's format, which ComfyUI's Hunyuan-DiT loader reads
    assert "controlnet_cond_embedding.conv_in.weight" not in state  # nor the diffusers UNet ControlNet format
    assert comfy_controlnet_loader(state) == "none"  # no SD3/Flux/Qwen branch takes it either
    # and the last resorts, the ldm ControlNet and the T2I-Adapter formats, need keys it lacks
    assert not {"zero_convs.0.0.weight", "control_model.zero_convs.0.0.weight", "body.0.in_conv.weight",
                "conv_in.weight", "backbone.0.0.weight", "backbone.10.blocks.0.weight"} & set(state)
    status = (Path(__file__).parents[1] / "docs" / "STATUS.md").read_text()
    assert "ComfyUI cannot load the Hunyuan-DiT ControlNet file" in status


# ---------------------------------------------------------------- SD3: the ControlNet takes VAE latents
def test_sd3_loss_parity_with_diffusers_train_controlnet_sd3_step(tiny_model):
    from diffusers import SD3ControlNetModel

    cfg = TrainingConfig(model_family="sd3", pretrained_model_name_or_path=str(tiny_model("sd3")), controlnet=True,
                         tokenizer_max_length=32)
    family = get_family("sd3")
    components = family.load(cfg, DTypePolicy())
    controlnet = attach_controlnet(family, components, cfg)
    with torch.no_grad():  # output layers no longer zero, so the ControlNet steers the transformer
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((3, 3, 32, 32), generator=generator) * 2 - 1
    control_pixels = torch.rand((3, 3, 32, 32), generator=generator) * 2 - 1
    sigmas = torch.tensor([0.3, 0.5, 0.93])
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
        text = family.text_outputs(components, CAPTIONS)
        entry = family.control_entry(components, control_pixels)
        batch = family.draw_conditioning(components, {"latents": latents, "text": text, **entry},
                                         torch.Generator().manual_seed(9))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
        ours = training_loss(family, components, family.objective(cfg, components), batch,
                             NoiseDraw(noise=noise, timesteps=sigmas * 1000))
        # the step of diffusers' examples/controlnet/train_controlnet_sd3.py
        vae = components["vae"]
        controlnet_image = vae.encode(control_pixels).latent_dist.sample(torch.Generator().manual_seed(9))
        controlnet_image = (controlnet_image - vae.config.shift_factor) * vae.config.scaling_factor
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        reference_net = SD3ControlNetModel.from_config(controlnet.config)
        reference_net.load_state_dict(controlnet.state_dict())
        samples = reference_net(hidden_states=noisy, timestep=sigmas * 1000,
                                encoder_hidden_states=text["prompt_embeds"],
                                pooled_projections=text["pooled_prompt_embeds"], controlnet_cond=controlnet_image,
                                return_dict=False)[0]
        model_pred = components["transformer"](hidden_states=noisy, timestep=sigmas * 1000,
                                               encoder_hidden_states=text["prompt_embeds"],
                                               pooled_projections=text["pooled_prompt_embeds"],
                                               block_controlnet_hidden_states=samples, return_dict=False)[0]
        reference = torch.mean(((model_pred.float() - (noise - latents).float()) ** 2).reshape(3, -1), 1).mean()
        plain = family.predict(components, noisy, sigmas * 1000, text, batch)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, model_pred), "the ControlNet did not change the prediction"


@pytest.mark.slow
def test_sd3_controlnet_lora_trains_and_loads_in_the_sd3_controlnet_pipeline(tmp_path, tiny_model):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

    config = controlnet_run(tmp_path, tiny_model("sd3"), "sd3", model_type="lora", max_train_steps=2,
                            checkpointing_steps=2, validation_steps=2, learning_rate=1e-2, tokenizer_max_length=32)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    assert list((output / "validation" / "step-2").glob("*-control.png"))
    base = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd3"))
    adapted = SD3ControlNetModel.from_pretrained(output / "controlnet_base")
    adapted.load_lora_adapter(str(output / "pytorch_lora_weights.safetensors"), prefix="controlnet")
    fused = SD3ControlNetModel.from_pretrained(output / "controlnet")
    edges = sorted((tmp_path / "edges").glob("*.png"))
    one, other = Image.open(edges[0]).resize((32, 32)), Image.open(edges[3]).resize((32, 32))

    def sample(controlnet, control):
        pipeline = StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
        pipeline.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # the pipeline draws the control image's latent with the global generator
        return pipeline("a red circle", control_image=control, width=32, height=32, num_inference_steps=2,
                        output_type="np", max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        from_fused = sample(fused, one)
        np.testing.assert_allclose(sample(adapted, one), from_fused, atol=1e-4)
        assert not np.array_equal(from_fused, sample(fused, other)), "the control image changed nothing"


# ---------------------------------------------------------------- Flux: the ControlNet takes packed VAE latents
def test_flux_loss_parity_with_diffusers_train_controlnet_flux_step(tiny_model):
    from diffusers import FluxControlNetModel, FluxPipeline

    cfg = TrainingConfig(model_family="flux", pretrained_model_name_or_path=str(tiny_model("flux")), controlnet=True,
                         tokenizer_max_length=32, flux_guidance_value=3.5)
    family = get_family("flux")
    components = family.load(cfg, DTypePolicy())
    controlnet = attach_controlnet(family, components, cfg)
    with torch.no_grad():  # output layers no longer zero, so the ControlNet steers the transformer
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((3, 3, 32, 32), generator=generator) * 2 - 1
    control = torch.rand((3, 3, 32, 32), generator=generator) * 2 - 1
    sigmas = torch.tensor([0.3, 0.6, 0.97])
    with torch.no_grad():
        mean, std = family.encode_images(components, images)
        latents = family.latents_from_distribution(components, mean, std, torch.Generator().manual_seed(4))
        text = family.text_outputs(components, CAPTIONS)
        batch = family.draw_conditioning(components, {"latents": latents, "text": text,
                                                      **family.control_entry(components, control)},
                                         torch.Generator().manual_seed(9))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
        ours = training_loss(family, components, family.objective(cfg, components), batch,
                             NoiseDraw(noise=noise, timesteps=sigmas * 1000))
        # the step of diffusers' examples/controlnet/train_controlnet_flux.py
        vae, transformer = components["vae"], components["transformer"]
        control_latents = vae.encode(control).latent_dist.sample(torch.Generator().manual_seed(9))
        control_latents = (control_latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        control_image = FluxPipeline._pack_latents(control_latents, b, c, h, w)
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(text["prompt_embeds"].shape[1], 3)
        guidance = torch.tensor([3.5]).expand(b) if transformer.config.guidance_embeds else None
        reference_net = FluxControlNetModel.from_config(controlnet.config)
        reference_net.load_state_dict(controlnet.state_dict())
        common = dict(hidden_states=packed, timestep=sigmas, guidance=guidance,
                      pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=text["prompt_embeds"],
                      txt_ids=text_ids, img_ids=image_ids, return_dict=False)
        blocks, single = reference_net(controlnet_cond=control_image, **common)
        prediction = transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                                 controlnet_blocks_repeat=False, **common)[0]
        scale = family.vae_scale_factor(components)
        prediction = FluxPipeline._unpack_latents(prediction, height=h * scale, width=w * scale, vae_scale_factor=scale)
        reference = torch.mean(((prediction.float() - (noise - latents).float()) ** 2).reshape(b, -1), 1).mean()
        plain = family.predict(components, noisy, sigmas * 1000, text, batch)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, prediction), "the ControlNet did not change the prediction"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_flux_controlnet_trains_and_loads_in_the_flux_controlnet_pipeline(tmp_path, tiny_model, model_type):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

    config = controlnet_run(tmp_path, tiny_model("flux"), "flux", model_type=model_type, max_train_steps=2,
                            checkpointing_steps=2, validation_steps=2, learning_rate=1e-2, tokenizer_max_length=32)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    assert list((output / "validation" / "step-2").glob("*-control.png"))
    base = FluxPipeline.from_pretrained(tiny_model("flux"))
    pipeline = FluxControlNetPipeline(**base.components, controlnet=FluxControlNetModel.from_pretrained(
        output / "controlnet"))
    pipeline.set_progress_bar_config(disable=True)
    edges = sorted((tmp_path / "edges").glob("*.png"))

    def sample(control):
        return pipeline("a red circle", control_image=control, width=32, height=32, num_inference_steps=2,
                        output_type="np", max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        first, second = sample(Image.open(edges[0]).resize((32, 32))), sample(Image.open(edges[3]).resize((32, 32)))
    assert np.isfinite(first).all() and not np.array_equal(first, second), "the control image changed nothing"


@pytest.mark.slow
def test_control_entries_are_keyed_by_content_a_changed_control_image_is_encoded_again(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1, disable_validation=True)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    changed = sorted((tmp_path / "edges").glob("*.png"))[2]
    ImageOps.invert(Image.open(changed).convert("RGB")).save(changed)
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "latents: 8 unique, 8 already cached, 0 encoded" in out  # the training images
    assert "latents: 8 unique, 7 already cached, 1 encoded" in out  # the control images: one changed


# ---------------------------------------------------------------- Hunyuan-DiT: the ControlNet takes VAE latents
def test_hunyuan_dit_loss_parity_with_a_plain_controlnet_step(tiny_model):
    """diffusers has no Hunyuan-DiT ControlNet training script: the reference is the HunyuanDiTControlNetPipeline's
    ControlNet call inside a plain DDPM v-prediction step (the pipeline's learned-variance chunk)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DControlNetModel

    cfg = TrainingConfig(model_family="hunyuan_dit", pretrained_model_name_or_path=str(tiny_model("hunyuan_dit")),
                         controlnet=True)
    family = get_family("hunyuan_dit")
    components = family.load(cfg, DTypePolicy())
    controlnet = attach_controlnet(family, components, cfg)
    with torch.no_grad():  # output layers no longer zero, so the ControlNet steers the transformer
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "input_block")):
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    generator = torch.Generator().manual_seed(3)
    control = torch.rand((3, 3, 32, 32), generator=generator) * 2 - 1
    with torch.no_grad():
        text = family.text_outputs(components, CAPTIONS)
        latents = torch.randn(3, 4, 4, 4, generator=generator)
        batch = family.draw_conditioning(components, {"latents": latents, "text": text,
                                                      **family.control_entry(components, control)},
                                         torch.Generator().manual_seed(9))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
        timesteps = torch.tensor([17, 500, 999])
        ours = training_loss(family, components, family.objective(cfg, components), batch,
                             NoiseDraw(noise=noise, timesteps=timesteps))
        vae, transformer = components["vae"], components["transformer"]
        control_image = vae.encode(control).latent_dist.sample(torch.Generator().manual_seed(9))
        control_image = control_image * vae.config.scaling_factor
        scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        reference_net = HunyuanDiT2DControlNetModel.from_config(controlnet.config)
        reference_net.load_state_dict(controlnet.state_dict())
        inputs = family._inputs(components, transformer, noisy, timesteps, text, batch)
        samples = reference_net(**inputs, controlnet_cond=control_image)[0]
        prediction, _ = transformer(**inputs, controlnet_block_samples=samples)[0].chunk(2, dim=1)
        reference = F.mse_loss(prediction.float(), target.float())
        plain = family.predict(components, noisy, timesteps, text, batch)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, prediction), "the ControlNet did not change the prediction"


@pytest.mark.slow
def test_hunyuan_dit_controlnet_trains_and_loads_in_its_controlnet_pipeline(tmp_path, tiny_model):
    from diffusers import HunyuanDiT2DControlNetModel, HunyuanDiTControlNetPipeline, HunyuanDiTPipeline

    config = controlnet_run(tmp_path, tiny_model("hunyuan_dit"), "hunyuan_dit", model_type="full",
                            max_train_steps=2, checkpointing_steps=2, validation_steps=2, learning_rate=1e-2)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    assert list((output / "validation" / "step-2").glob("*-control.png"))
    base = HunyuanDiTPipeline.from_pretrained(tiny_model("hunyuan_dit"))
    pipeline = HunyuanDiTControlNetPipeline(**base.components, controlnet=HunyuanDiT2DControlNetModel.from_pretrained(
        output / "controlnet"))
    pipeline.set_progress_bar_config(disable=True)
    edges = sorted((tmp_path / "edges").glob("*.png"))

    def sample(control):
        torch.manual_seed(0)  # the pipeline draws the control image's latent with the global generator
        return pipeline("a red circle", control_image=control, width=32, height=32, num_inference_steps=2,
                        output_type="np", use_resolution_binning=False,
                        generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        first, second = sample(Image.open(edges[0]).resize((32, 32))), sample(Image.open(edges[3]).resize((32, 32)))
    assert np.isfinite(first).all() and not np.array_equal(first, second), "the control image changed nothing"


def test_a_conditioning_dataset_without_an_image_dataset_exits_2_naming_it(tmp_path, tiny_model, capsys):
    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends.insert(2, {**backends[1], "id": "depth"})  # a second conditioning dataset nobody names
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    assert main(["train", str(config)]) == 2
    assert "conditioning dataset(s) 'depth' are paired with no image dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_controlnet_model_name_or_path_starts_from_a_saved_controlnet(tmp_path, tiny_model, capsys):
    from safetensors.torch import load_file

    config = controlnet_run(tmp_path, tiny_model("sd1x"), "sd1x", model_type="full", max_train_steps=1,
                            disable_validation=True)
    assert main(["train", str(config)]) == 0
    first = tmp_path / "output" / "controlnet"
    # a run whose optimiser barely moves the weights exports what it started from (a ControlNet made from the
    # UNet would have a freshly drawn control-image embedding instead)
    assert main(["train", str(config), "--controlnet_model_name_or_path", str(first), "--learning_rate", "1e-30",
                 "--output_dir", str(tmp_path / "again")]) == 0
    saved = load_file(str(first / "diffusion_pytorch_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == again.keys()
    assert all(torch.allclose(saved[k], again[k], rtol=0, atol=1e-20) for k in saved)
    capsys.readouterr()
    assert main(["train", str(config), "--controlnet_model_name_or_path", str(tmp_path / "nothing-here"),
                 "--output_dir", str(tmp_path / "third")]) == 2
    assert "nothing-here" in capsys.readouterr().err
