"""The diffusers LoRA file loads whole: every tensor in it is consumed by the family's own
`load_lora_weights`, with no loader warning, and applies the trained delta (alpha and DoRA included),
for every family and every LoRA target preset. Also: metadata, permissions, the format registry."""

from __future__ import annotations

import json
import logging
import stat
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.registry import get_family
from simpletuner.publish.export import LoraFormat, check_lora_format, read_family_lora, write_lora_files
from simpletuner.publish.lora_files import read_diffusers_lora
from simpletuner.train.adapters import LORA_WEIGHTS, TrainedLora, apply_lora

# diffusers says this for every LoRA that trains no text encoder, whatever the file holds (lora_base.py,
# _load_lora_into_text_encoder): the one loader warning a complete denoiser-only file still gets.
NO_TEXT_ENCODER_LORA = "No LoRA keys associated to"

# (tiny model, model_family, options, use_dora)
CASES = [
    ("sd1x", "sd1x", {"unet_lora_target": "attention"}, False),
    ("sd1x", "sd1x", {"unet_lora_target": "attention+ffs"}, True),
    ("sd2x", "sd2x", {"unet_lora_target": "attention+ffs"}, False),
    ("sdxl", "sdxl", {"unet_lora_target": "attention"}, True),
    ("sdxl", "sdxl", {"unet_lora_target": "attention+ffs"}, False),
    ("sdxl_refiner", "sdxl", {"unet_lora_target": "attention+ffs"}, False),
    ("sd3", "sd3", {"unet_lora_target": "attention"}, False),
    ("sd3", "sd3", {"unet_lora_target": "attention+ffs"}, True),
    ("kolors", "kolors", {"unet_lora_target": "attention+ffs"}, False),
    ("deepfloyd_if", "deepfloyd", {"model_type": "deepfloyd-lora"}, False),
    ("deepfloyd_if_stage2", "deepfloyd", {"model_type": "deepfloyd-stage2-lora"}, True),
] + [("flux", "flux", {"flux_lora_target": preset}, preset in ("all+ffs", "context"))
     for preset in ("all", "mmdit", "context", "context+ffs", "all+ffs", "ai-toolkit", "tiny", "nano")]


def _ids(case) -> str:
    tiny, _, options, dora = case
    return "-".join([tiny, *map(str, options.values())] + (["dora"] if dora else []))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def loader_warnings():
    """Every warning diffusers and peft give (their loggers at WARNING, and Python warnings)."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _pipeline(tiny_model, tiny: str, preset: str | None):
    """The tiny pipeline; for Flux's "tiny"/"nano" presets its transformer has 21 single blocks
    (those presets name blocks 7 and 20), built from a fixed seed so every call gives the same weights."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_model(tiny))
    if preset in ("tiny", "nano"):
        from diffusers import FluxTransformer2DModel

        config = dict(pipeline.transformer.config, num_single_layers=21)
        torch.manual_seed(0)
        pipeline.transformer = FluxTransformer2DModel.from_config(config)
    return pipeline


def _train_like(model: torch.nn.Module) -> None:
    """Give every adapter weight a non-trivial value, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _merged(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Each adapted module's base weight with the adapter merged in (LoRA B@A*alpha/r, DoRA's magnitude)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter])
            merged[name] = module.get_base_layer().weight.detach().clone()
    return merged


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_every_tensor_of_the_diffusers_file_loads_at_the_trained_strength(tmp_path, tiny_model, case):
    from peft import get_peft_model_state_dict

    tiny, model_family, options, use_dora = case
    cfg = TrainingConfig(model_family=model_family, pretrained_model_name_or_path=str(tiny_model(tiny)),
                         lora_rank=4, lora_alpha=2, use_dora=use_dora, **options)
    family = get_family(model_family)
    pipeline = _pipeline(tiny_model, tiny, options.get("flux_lora_target"))
    name = family.denoiser_name()
    denoiser = getattr(pipeline, name)
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    apply_lora(denoiser, rank=4, alpha=2, use_dora=use_dora, target_modules=family.adapter_targets(cfg))
    _train_like(denoiser)
    lora = TrainedLora.from_models(type(pipeline).__name__, {name: denoiser}, {"modelspec.title": "t"})
    [file] = write_lora_files(family, lora, tmp_path, ["diffusers"])
    assert file == tmp_path / LORA_WEIGHTS

    in_file = load_file(file)
    assert all(key.startswith(f"{name}.") and (".lora_A." in key or ".lora_B." in key or
                                               key.endswith(".lora_magnitude_vector")) for key in in_file)
    assert any(key.endswith(".lora_magnitude_vector") for key in in_file) == use_dora

    fresh = _pipeline(tiny_model, tiny, options.get("flux_lora_target"))
    with loader_warnings() as messages:
        fresh.load_lora_weights(tmp_path, weight_name=LORA_WEIGHTS, adapter_name="t")
    assert [m for m in messages if NO_TEXT_ENCODER_LORA not in m] == []
    loaded_model = getattr(fresh, name)
    loaded = get_peft_model_state_dict(loaded_model, adapter_name="t")
    assert len(loaded) == len(in_file), f"{len(in_file) - len(loaded)} of {len(in_file)} tensors were dropped"
    assert {f"{name}.{key}" for key in loaded} == set(in_file)
    for key, value in loaded.items():
        torch.testing.assert_close(value, in_file[f"{name}.{key}"], rtol=0, atol=0)

    trained, applied = _merged(denoiser, "default"), _merged(loaded_model, "t")
    assert set(applied) == set(trained) and trained
    for module, weight in trained.items():
        torch.testing.assert_close(applied[module], weight, rtol=1e-5, atol=1e-6)
        assert not torch.equal(weight, base[f"{module}.weight"]), f"{module}: the adapter changed nothing"


def test_pixart_keeps_peft_folder_that_peft_loads_whole(tmp_path, tiny_model):
    from diffusers import DiffusionPipeline
    from peft import PeftModel, get_peft_model_state_dict

    family = get_family("pixart_sigma")
    cfg = TrainingConfig(model_family="pixart_sigma", pretrained_model_name_or_path="x",
                         unet_lora_target="attention+ffs")
    pipeline = DiffusionPipeline.from_pretrained(tiny_model("pixart_sigma"))
    apply_lora(pipeline.transformer, rank=4, alpha=8, use_dora=True, target_modules=family.adapter_targets(cfg))
    _train_like(pipeline.transformer)
    lora = TrainedLora.from_models("PixArtSigmaPipeline", {"transformer": pipeline.transformer}, {"a": "b"})
    [file] = write_lora_files(family, lora, tmp_path, ["diffusers"])
    fresh = DiffusionPipeline.from_pretrained(tiny_model("pixart_sigma"))
    with loader_warnings() as messages:
        model = PeftModel.from_pretrained(fresh.transformer, tmp_path)
    assert messages == []
    loaded = get_peft_model_state_dict(model)
    assert len(loaded) == len(load_file(file)) == len(lora.layers["transformer"])
    trained, applied = _merged(pipeline.transformer, "default"), _merged(model, "default")
    for module, weight in trained.items():
        torch.testing.assert_close(applied[f"base_model.model.{module}"], weight, rtol=1e-5, atol=1e-6)
    back = read_family_lora(family, tmp_path, "PixArtSigmaPipeline")
    assert back.metadata == {"a": "b"} and back.configs["transformer"]["lora_alpha"] == 8
    assert all(torch.equal(back.layers["transformer"][k], v) for k, v in lora.layers["transformer"].items())


def test_file_is_0644_carries_metadata_and_reads_back(tmp_path, tiny_model):
    from diffusers import DiffusionPipeline

    from simpletuner.models.base import Components
    from simpletuner.publish.metadata import file_metadata, summarize

    model = tiny_model("sdxl")
    cfg = TrainingConfig(model_family="sdxl", pretrained_model_name_or_path=str(model), lora_rank=4, lora_alpha=2,
                         resolution=1024, tracker_run_name="my-lora")
    datasets = [type("D", (), {"instance_prompt": "sks dog"})(), type("D", (), {"instance_prompt": None})()]
    pipeline = DiffusionPipeline.from_pretrained(model)
    family = get_family("sdxl")
    components = Components(dict(pipeline.components), None, str(model), "StableDiffusionXLPipeline")
    metadata = file_metadata(summarize(cfg, family, components, 1500, datasets=datasets,
                                       dataset_sizes={"dogs": 12}))
    apply_lora(pipeline.unet, rank=4, alpha=2, target_modules=family.adapter_targets(cfg))
    lora = TrainedLora.from_models("StableDiffusionXLPipeline", {"unet": pipeline.unet}, metadata)
    [file] = write_lora_files(family, lora, tmp_path, ["diffusers"])
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".tmp-*"))
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata()
    assert header["modelspec.sai_model_spec"] == "1.0.0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.title"] == "my-lora" and header["modelspec.resolution"] == "1024x1024"
    assert header["modelspec.trigger_phrase"] == "sks dog"
    assert header["modelspec.date"].endswith("Z")
    assert header["simpletuner.base_model"] == model.name and str(model.parent) not in json.dumps(header)
    assert header["simpletuner.steps"] == "1500" and header["simpletuner.lora_rank"] == "4"
    assert header["simpletuner.lora_alpha"] == "2" and header["simpletuner.model_family"] == "sdxl"
    assert json.loads(header["simpletuner.datasets"]) == {"dogs": 12}
    adapter = json.loads(header["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2
    back = read_diffusers_lora(file, "StableDiffusionXLPipeline")
    assert back.metadata == metadata and back.configs["unet"]["lora_alpha"] == 2
    module = back.modules("unet")[0]
    assert back.alpha("unet", module) == 2 and back.rank("unet", module) == 4
    assert set(back.layers["unet"]) == set(lora.layers["unet"])


def test_format_registry_refuses_unknown_formats_and_formats_a_family_cannot_have(tmp_path):
    family = get_family("deepfloyd")
    with pytest.raises(UserError, match=r"LoRA format 'kohya' does not exist; accepted: diffusers"):
        check_lora_format("kohya", family)
    registry = {"diffusers": LoraFormat("diffusers", "", lambda f, lora, d: d),
                "ui": LoraFormat("ui", "", lambda f, lora, d: d, supports=lambda f: f.name != "deepfloyd")}
    with pytest.raises(UserError, match=r"'ui' is not available for model_family 'deepfloyd'; it can have: diffusers"):
        write_lora_files(family, None, tmp_path, ["ui"], registry)
    assert check_lora_format("ui", get_family("sdxl"), registry).name == "ui"
    with pytest.raises(UserError, match=r"'comfyui' is not available for model_family 'deepfloyd'; it can have: "
                       r"diffusers$"):
        check_lora_format("comfyui", family)


def test_merged_pipeline_of_a_family_without_a_lora_loader(tmp_path, tiny_model):
    """PixArt: the LoRA is fused through peft, and the saved pipeline computes what base + adapter computed."""
    from diffusers import DiffusionPipeline

    from simpletuner.models.base import DTypePolicy
    from simpletuner.publish.convert import write_merged_pipeline

    family = get_family("pixart_sigma")
    cfg = TrainingConfig(model_family="pixart_sigma", pretrained_model_name_or_path=str(tiny_model("pixart_sigma")),
                         lora_rank=4, lora_alpha=2)
    components = family.load(cfg, DTypePolicy())
    trained = DiffusionPipeline.from_pretrained(tiny_model("pixart_sigma")).transformer
    apply_lora(trained, rank=4, alpha=2, target_modules=family.adapter_targets(cfg))
    _train_like(trained)
    lora = TrainedLora.from_models("PixArtSigmaPipeline", {"transformer": trained})
    folder = write_merged_pipeline(family, components, lora, tmp_path / "merged")
    merged = DiffusionPipeline.from_pretrained(folder).transformer
    assert not any("lora" in name for name in merged.state_dict())
    inputs = dict(encoder_hidden_states=torch.randn(1, 8, merged.config.caption_channels),
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(latents, **inputs)[0], trained(latents, **inputs)[0], rtol=1e-4, atol=1e-5)

