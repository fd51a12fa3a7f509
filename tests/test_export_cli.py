"""`simpletuner train` leaves a loadable LoRA in the output and in every checkpoint, and `simpletuner export`
turns an output or a checkpoint into the diffusers file or a merged pipeline; bad input exits 2."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_export import NO_TEXT_ENCODER_LORA, loader_warnings
from train_helpers import write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """One 4-step SD 1.x LoRA run (rank 4, alpha 2, attention+ffs, DoRA, EMA) with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("export-run")
    model = tiny_model("sd1x")
    config = write_run(root, model, "sd1x", lora_alpha=2, unet_lora_target="attention+ffs", use_dora=True,
                       validation_steps=100, tracker_run_name="shapes-lora", use_ema=True, ema_decay=0.5)
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0].update(caption_strategy="instanceprompt", instance_prompt="sks shape")
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    assert main(["train", str(config)]) == 0
    return {"root": root, "model": model, "output": root / "output"}


def _header(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata()


def _load_whole(model: Path, folder: Path):
    """The base pipeline with the LoRA of `folder` loaded, after checking that every tensor was taken."""
    from diffusers import DiffusionPipeline
    from peft import get_peft_model_state_dict

    pipeline = DiffusionPipeline.from_pretrained(model)
    with loader_warnings() as messages:
        pipeline.load_lora_weights(folder, weight_name=LORA, adapter_name="x")
    assert [m for m in messages if NO_TEXT_ENCODER_LORA not in m] == []
    loaded = get_peft_model_state_dict(pipeline.unet, adapter_name="x")
    in_file = load_file(folder / LORA)
    assert len(loaded) == len(in_file) and all(torch.equal(v, in_file[f"unet.{k}"]) for k, v in loaded.items())
    return pipeline


def test_every_checkpoint_keeps_a_loadable_lora_with_its_step(run):
    output = run["output"]
    for step in (2, 4):
        folder = output / "checkpoints" / f"step-{step:06d}"
        _load_whole(run["model"], folder)
        header = _header(folder / LORA)
        assert header["simpletuner.steps"] == str(step)
        assert header["modelspec.trigger_phrase"] == "sks shape" and header["modelspec.title"] == "shapes-lora"
        assert json.loads(header["simpletuner.datasets"]) == {"shapes": 12}
        assert str(run["root"]) not in json.dumps(header)
    # with EMA, a checkpoint's LoRA file holds the averaged weights (as the final export), not the raw ones
    folder = output / "checkpoints" / "step-000002"
    raw = {key.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector"): value
           for key, value in load_file(folder / "trained.safetensors").items()}
    averaged = {key.removeprefix("unet."): value for key, value in load_file(folder / LORA).items()}
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[key], averaged[key]) for key in raw)
    final = load_file(output / LORA)
    last = load_file(output / "checkpoints" / "step-000004" / LORA)
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert not torch.equal(load_file(output / "checkpoints" / "step-000002" / LORA)[next(iter(final))],
                           final[next(iter(final))])


def test_export_a_checkpoint_as_the_diffusers_file(run, tmp_path, capsys):
    checkpoint = run["output"] / "checkpoints" / "step-000002"
    destination = tmp_path / "step2"
    assert main(["export", str(checkpoint), "--output", str(destination)]) == 0
    assert "exported step 2 of sd1x (checkpoint) as diffusers" in capsys.readouterr().out
    file = destination / LORA
    assert sorted(p.name for p in destination.iterdir()) == [LORA]  # no temporary file left
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    source, exported = load_file(checkpoint / LORA), load_file(file)
    assert source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)
    assert _header(file) == _header(checkpoint / LORA)
    _load_whole(run["model"], destination)


def test_export_a_dora_checkpoint_for_comfyui_reproduces_the_runs_own_file(run, tmp_path, capsys):
    """A DoRA LoRA read back from the diffusers file: export loads the base weights for dora_scale and writes
    the very file the run wrote into the checkpoint (lora_format's default: both files)."""
    checkpoint = run["output"] / "checkpoints" / "step-000002"
    own = checkpoint / "shapes-lora.safetensors"
    assert main(["export", str(checkpoint), "--output", str(tmp_path / "ui"), "--format", "comfyui"]) == 0
    assert "as comfyui" in capsys.readouterr().out
    exported = tmp_path / "ui" / own.name
    assert sorted(p.name for p in (tmp_path / "ui").iterdir()) == [own.name]
    assert stat.S_IMODE(exported.stat().st_mode) == 0o644
    ours, theirs = load_file(own), load_file(exported)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sum(k.endswith(".dora_scale") for k in ours) == sum(k.endswith(".lora_magnitude_vector")
                                                             for k in load_file(checkpoint / LORA))
    assert _header(exported) == _header(own) and _header(own)["ss_output_name"] == "shapes-lora"
    assert _header(own)["simpletuner.steps"] == "2" and (run["output"] / own.name).is_file()


def test_export_an_output_as_a_merged_pipeline(run, tmp_path):
    from diffusers import DiffusionPipeline

    destination = tmp_path / "merged"
    assert main(["export", str(run["output"]), "--format", "merged", "--output", str(destination)]) == 0
    merged = DiffusionPipeline.from_pretrained(destination)
    [weights] = list((destination / "unet").glob("*.safetensors"))
    header = _header(weights)
    assert header["modelspec.architecture"] == "stable-diffusion-v1" and header["simpletuner.steps"] == "4"
    assert header["modelspec.trigger_phrase"] == "sks shape" and header["simpletuner.adapter"] == "lora (merged)"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    reference = _load_whole(run["model"], run["output"])
    reference.fuse_lora(components=["unet"], lora_scale=1.0)
    reference.unload_lora_weights()
    expected = reference.unet.state_dict()
    got = merged.unet.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    base = DiffusionPipeline.from_pretrained(run["model"]).unet.state_dict()
    assert any(not torch.equal(base[key], got[key]) for key in got)


def test_bad_sources_and_formats_exit_2(run, tmp_path, capsys):
    cases = [
        ([str(run["root"] / "dataset"), "-o", str(tmp_path / "a")], "neither a training output"),
        ([str(tmp_path / "absent"), "-o", str(tmp_path / "a")], "no such folder"),
        ([str(run["output"]), "-o", str(tmp_path / "a"), "--format", "kohya"],
         "export format 'kohya' does not exist; accepted: diffusers, comfyui, merged"),
        ([str(run["output"]), "-o", str(run["root"]), "--format", "merged"], "exists and is not empty"),
    ]
    for edit, message in (({"model_type": "full"}, "is a full fine-tune"),
                          ({"lora_type": "lycoris"}, "is a LyCORIS run"),
                          ({"lora_format": ["comfyui"]}, "the run wrote lora_format comfyui only"),
                          (None, "no pytorch_lora_weights.safetensors")):
        copy = tmp_path / f"copy-{len(cases)}" / "step-000002"
        copy.mkdir(parents=True)
        checkpoint = run["output"] / "checkpoints" / "step-000002"
        for name in ("meta.json", "config.json", "trained.safetensors"):
            (copy / name).write_bytes((checkpoint / name).read_bytes())
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **(edit or {})}))
        cases.append(([str(copy), "-o", str(tmp_path / "a")], message))
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
