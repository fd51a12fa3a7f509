"""Quantised frozen bases: LoRA trains through `simpletuner train` on every family's tiny model with an
int8-quanto base (and its text encoder), the adapter loads on the unquantised pipeline, the first loss
stays close to the unquantised base's, and bad requests stop with exit 2 and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.config.quantisation import LIBRARY
from simpletuner.testing.tiny import FAMILIES, sample_kwargs
from simpletuner.train.quantize import quantize_module

# tiny family -> (model_family, model_type, resolution)
RUNS = {
    "sd1x": ("sd1x", "lora", 32), "sd2x": ("sd2x", "lora", 32), "sdxl": ("sdxl", "lora", 64),
    "sd3": ("sd3", "lora", 32),
    "flux": ("flux", "lora", 32), "pixart_sigma": ("pixart_sigma", "lora", 32), "kolors": ("kolors", "lora", 64),
    "hunyuan_dit": ("hunyuan_dit", "lora", 32), "deepfloyd_if": ("deepfloyd", "deepfloyd-lora", 32),
}
PEFT_LORA = {"pixart_sigma", "hunyuan_dit"}  # pipelines without a LoRA loader
# The first step's loss (same batch, same noise) of an int8 base lies within this share of the unquantised one.
INT8_LOSS_TOLERANCE = 0.02


def _run(tmp_path: Path, tiny_model, tiny: str, steps: int = 2, **options) -> Path:
    family, model_type, resolution = RUNS[tiny]
    text = {} if tiny == "hunyuan_dit" else {"tokenizer_max_length": 32}
    config = write_run(tmp_path, tiny_model(tiny), tiny, model_family=family, model_type=model_type,
                       resolution=resolution, validation_resolution=str(resolution), max_train_steps=steps,
                       checkpointing_steps=steps, validation_steps=steps, **text, **options)
    assert main(["train", str(config)]) == 0
    return tmp_path / "output"


def _sample(pipeline, tiny: str) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(**sample_kwargs(tiny), output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_every_family_is_in_the_table() -> None:
    assert set(RUNS) <= set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("tiny", list(RUNS))
def test_int8_quanto_lora_trains_and_loads_on_the_unquantised_base(tmp_path: Path, tiny_model, tiny: str) -> None:
    from diffusers import DiffusionPipeline

    output = _run(tmp_path, tiny_model, tiny, base_model_precision="int8-quanto",
                  text_encoder_1_precision="int8-quanto")
    losses = metrics(output)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    pipeline = DiffusionPipeline.from_pretrained(tiny_model(tiny))
    before = _sample(pipeline, tiny)
    if tiny in PEFT_LORA:
        from peft import PeftModel

        pipeline.transformer = PeftModel.from_pretrained(pipeline.transformer, output)
    else:
        pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    after = _sample(pipeline, tiny)
    assert np.isfinite(after).all() and not np.array_equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("tiny", ["flux", "sdxl"])
def test_int8_loss_stays_within_tolerance_of_the_unquantised_base(tmp_path: Path, tiny_model, tiny: str) -> None:
    plain = metrics(_run(tmp_path / "plain", tiny_model, tiny, steps=1))[1]
    int8 = metrics(_run(tmp_path / "int8", tiny_model, tiny, steps=1, base_model_precision="int8-quanto"))[1]
    assert int8 != plain, "the base was not quantised"
    assert abs(int8 - plain) <= INT8_LOSS_TOLERANCE * plain, (plain, int8)


@pytest.mark.slow
@pytest.mark.parametrize("tiny", ["flux", "sdxl", "pixart_sigma"])
@pytest.mark.parametrize("precision", ["nf4-bnb", "int8-torchao"])
def test_other_libraries_train_lora_on_cpu(tmp_path: Path, tiny_model, precision: str, tiny: str) -> None:
    pytest.importorskip(LIBRARY[precision].module)
    output = _run(tmp_path, tiny_model, tiny, base_model_precision=precision)
    assert all(np.isfinite(list(metrics(output).values())))
    weights = "adapter_model.safetensors" if tiny in PEFT_LORA else "pytorch_lora_weights.safetensors"
    assert (output / weights).is_file()


@pytest.mark.slow
def test_lycoris_trains_on_a_quantised_base_and_loads_on_the_unquantised_one(tmp_path: Path, tiny_model) -> None:
    pytest.importorskip("lycoris")
    from diffusers import FluxTransformer2DModel
    from lycoris import create_lycoris_from_weights
    from safetensors.torch import load_file

    lycoris_config = tmp_path / "lokr.json"
    lycoris_config.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1}))
    output = _run(tmp_path, tiny_model, "flux", base_model_precision="int8-quanto", lora_type="lycoris",
                  lycoris_config=str(lycoris_config), init_lokr_norm=1e-3)
    assert all(np.isfinite(list(metrics(output).values())))
    weights = output / "pytorch_lora_weights.safetensors"
    assert any("lokr_w" in key for key in load_file(weights))
    transformer = FluxTransformer2DModel.from_pretrained(tiny_model("flux"), subfolder="transformer")
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    network, _ = create_lycoris_from_weights(1.0, str(weights), transformer)
    network.merge_to()
    assert any(not torch.equal(before[k], v) for k, v in transformer.state_dict().items())


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "fp8-quanto", "int8-torchao", "nf4-bnb"])
def test_quantised_layers_keep_their_outputs_close(precision: str) -> None:
    pytest.importorskip(LIBRARY[precision].module)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    model.add_module("proj_out", nn.Linear(64, 64))
    x = torch.randn(8, 64)
    reference = model(x)
    quantize_module(model, precision)
    swapped = type(model[0]) is not nn.Linear or type(model[0].weight) is not nn.Parameter  # torchao: tensors
    assert swapped, "the linear layer was not quantised"
    assert type(model.proj_out) is nn.Linear and type(model.proj_out.weight) is nn.Parameter  # kept as it was
    error = (model(x) - reference).abs().max().item() / reference.abs().max().item()
    assert 0 < error < {"int4-quanto": 0.2, "nf4-bnb": 0.2}.get(precision, 0.05)


def _check(tmp_path: Path, tiny_model, **options) -> tuple[int, str]:
    config = write_run(tmp_path, tiny_model("flux"), "flux", model_family="flux", **options)
    return main(["config", "check", str(config)]), str(config)


def test_nf4_on_a_full_fine_tune_is_refused(tmp_path: Path, tiny_model, capsys) -> None:
    code, _ = _check(tmp_path, tiny_model, model_type="full", base_model_precision="nf4-bnb")
    assert code == 2 and "quantised weights cannot be trained" in capsys.readouterr().err


def test_an_unknown_precision_is_refused(tmp_path: Path, tiny_model, capsys) -> None:
    code, _ = _check(tmp_path, tiny_model, base_model_precision="int3-quanto")
    assert code == 2 and "base_model_precision" in capsys.readouterr().err


def test_a_cuda_only_precision_is_refused_on_the_cpu(tmp_path: Path, tiny_model, capsys) -> None:
    pytest.importorskip("torchao")
    config = write_run(tmp_path, tiny_model("flux"), "flux", model_family="flux", base_model_precision="fp8-torchao")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "fp8-torchao" in err and "cannot run on cpu" in err and "Traceback" not in err
    assert not (tmp_path / "output" / "metrics.jsonl").exists()


def test_a_missing_library_gives_the_install_hint(tmp_path: Path, tiny_model, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # the library is not installed (the narrowest boundary)
                        lambda name, *a: None if name.startswith("bitsandbytes") else real(name, *a))
    code, _ = _check(tmp_path, tiny_model, base_model_precision="nf4-bnb")
    err = capsys.readouterr().err
    assert code == 2 and "needs the bitsandbytes package" in err and "pip install 'simpletuner[quant]'" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_torchao_trains_on_cuda(tmp_path: Path, tiny_model) -> None:
    pytest.importorskip("torchao")
    output = _run(tmp_path, tiny_model, "flux", base_model_precision="fp8-torchao", quantize_via="accelerator")
    assert all(np.isfinite(list(metrics(output).values())))
