"""Tiny models of every family: build, reload, sample, determinism, safe concurrent builds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from simpletuner.errors import UserError
from simpletuner.testing import tiny
from simpletuner.testing.tiny_tokenizers import TokenizerKit

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sample(folder: Path, family: str) -> torch.Tensor:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(**tiny.sample_kwargs(family), output_type="pt", generator=generator).images


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_builds_reloads_and_samples(tiny_model, family):
    spec = tiny.SPECS[family]
    folder = tiny_model(family)
    size = sum(len(data) for data in _files(folder).values())
    assert 1e6 <= size <= 6e6, f"{family}: {size / 1e6:.2f} MB"

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == spec.pipeline_class
    for attribute, length in spec.text_max_lengths.items():
        assert getattr(pipe, attribute).model_max_length == length
    if spec.vae_scale_factor > 1:
        assert pipe.vae.config.latent_channels == spec.latent_channels
        assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == spec.vae_scale_factor

    images = _sample(folder, family)
    assert images.shape == (1, 3, spec.sample_size, spec.sample_size)
    assert torch.isfinite(images).all()
    assert images.std() > 0  # not a constant image


def test_family_conventions(tiny_models):
    load = DiffusionPipeline.from_pretrained
    assert load(tiny_models["sd2x"]).scheduler.config.prediction_type == "v_prediction"
    assert load(tiny_models["sd1x"]).scheduler.config.prediction_type == "epsilon"
    refiner = load(tiny_models["sdxl_refiner"])
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.unet.config.projection_class_embeddings_input_dim == 5 * 8 + 64  # 5 time ids + pooled
    for family in ("sd3", "flux"):
        vae = load(tiny_models[family]).vae
        assert vae.config.shift_factor is not None and vae.config.scaling_factor > 0
    sd3 = load(tiny_models["sd3"])  # CLIP states (32 + 48) are padded, never cut, to the T5 width
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert clip_width < sd3.text_encoder_3.config.d_model == sd3.transformer.config.joint_attention_dim
    assert load(tiny_models["flux"]).transformer.config.guidance_embeds is True


@pytest.mark.parametrize("family", ["sd1x", "sdxl", "sd3", "flux", "kolors"])
def test_vae_scaling_brings_latents_to_unit_variance(tiny_model, family):
    from simpletuner.testing.tiny_parts import calibration_images

    vae = DiffusionPipeline.from_pretrained(tiny_model(family)).vae
    with torch.no_grad():  # other images than the calibration set: a real check, with slack
        latents = vae.encode(calibration_images(32, seed=99)).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    scaled = (latents - shift) * vae.config.scaling_factor
    assert 0.5 < scaled.std().item() < 2.0
    assert abs(scaled.mean().item()) < 0.5


def test_tokenizers_ids_and_coverage():
    kit = TokenizerKit()
    clip = kit.clip
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (0, 1, 1)
    ids = clip("Zebra #42 ~ {odd} ünïcödé ✓ stuff").input_ids
    assert ids[0] == 0 and ids[-1] == 1 and 1 not in ids[1:-1]  # every byte is known: no unk (= eos) inside
    t5 = kit.t5
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5("a red fox").input_ids[-1] == 1
    glm = kit.chatglm
    sp = glm.tokenizer.sp_model
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    padded = glm("a red fox", padding="max_length", max_length=16).input_ids
    assert len(padded) == 16 and padded[0] == glm.pad_token_id  # Kolors pads on the left


def test_clip_config_takes_ids_from_tokenizer(tiny_model):
    pipe = DiffusionPipeline.from_pretrained(tiny_model("sdxl"))
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.bos_token_id == tokenizer.bos_token_id
        assert encoder.config.vocab_size == len(tokenizer)


def test_two_processes_building_all_at_once_match_the_shared_builds(tiny_models, tmp_path):
    """As pytest-xdist workers do: both succeed, nothing half-written is left, and the same
    seed gives the same bytes in other processes (tokenizer training included)."""
    code = (
        "import sys, time; from pathlib import Path; t = time.perf_counter()\n"
        "from simpletuner.testing import tiny; tiny.build_all(Path(sys.argv[1]))\n"
        "print(f'{time.perf_counter() - t:.1f}')"
    )
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [worker.communicate() for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    print(f"build_all of {len(tiny.FAMILIES)} families, two processes at once: "
          f"{' s and '.join(out.strip() for out, _ in outputs)} s after start-up, "
          f"{time.perf_counter() - started:.1f} s in all")
    for family, folder in tiny_models.items():
        assert _files(tmp_path / family) == _files(folder), family
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_other_seed_other_weights(tiny_model, tmp_path):
    other = tiny.build("pixart_sigma", tmp_path / "pixart", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tiny_model("pixart_sigma") / name), load_file(other / name)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((other / tiny.MARKER).read_text())["seed"] == 1


def test_rebuild_is_skipped_when_complete_and_redone_when_seed_differs(tmp_path):
    folder = tiny.build("flux", tmp_path / "flux")
    marker = folder / tiny.MARKER
    first = marker.stat().st_mtime_ns
    assert tiny.build("flux", folder) == folder and marker.stat().st_mtime_ns == first
    assert tiny.is_complete(folder, "flux", 0) and not tiny.is_complete(folder, "flux", 1)
    tiny.build("flux", folder, seed=1)
    assert json.loads(marker.read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".flux.")) == [".flux.lock"]


def test_folder_with_other_content_is_never_replaced(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"mine.*tiny-model.json"):
        tiny.build("sd1x", folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_unknown_family_names_the_choices(tmp_path):
    with pytest.raises(UserError, match=r"'sdxl_refine'.*sd1x, sd2x.*Did you mean 'sdxl_refiner'"):
        tiny.build("sdxl_refine", tmp_path / "x")
