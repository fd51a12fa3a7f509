"""Speed levers of `simpletuner train` (train/levers.py): what `auto` resolves to, and runs with each lever on
against eager runs of the same batches."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.errors import ConfigError
from simpletuner.train.levers import Levers, attention_context, resolve_levers

COMPILE_TOLERANCE = 1e-4  # relative, per step's loss: inductor fuses and reorders float sums


def _options(**values):
    return SimpleNamespace(**{"torch_compile": "auto", "channels_last": "auto", "attention_backend": "auto", **values})


def test_auto_is_off_on_cpu_and_on_for_unets_on_cuda() -> None:
    unet = torch.nn.Module()
    unet.conv_in = torch.nn.Conv2d(4, 8, 3)
    transformer = torch.nn.Linear(4, 4)
    assert resolve_levers(_options(), unet, torch.device("cpu")) == Levers(False, False, None)
    assert resolve_levers(_options(), unet, torch.device("cuda")) == Levers(True, True, None)
    assert resolve_levers(_options(), transformer, torch.device("cuda")) == Levers(True, False, None)
    assert resolve_levers(_options(channels_last=True), transformer, torch.device("cpu")).channels_last is False
    with pytest.raises(ConfigError, match="attention_backend 'cudnn' needs a CUDA device"):
        resolve_levers(_options(attention_backend="cudnn"), unet, torch.device("cpu"))


def test_attention_backend_restricts_sdpa_to_that_kernel() -> None:
    q = torch.randn(1, 2, 8, 16)
    with attention_context(Levers(False, False, "math")):
        reference = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with attention_context(Levers(False, False, "flash")):
        assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, q, q), reference, atol=1e-5)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.raises(RuntimeError):  # no such kernel on CPU
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def _run(root: Path, model: Path, dataset: Path | None = None, **options) -> Path:
    config = write_run(root, model, "sd1x", dataset=dataset, disable_validation=True, max_train_steps=4,
                       checkpointing_steps=2, **options)
    assert main(["train", str(config)]) == 0
    return root / "output"


@pytest.mark.slow
def test_levers_on_cpu_train_like_eager_and_compiled_runs_resume_exactly(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    eager = metrics(_run(tmp_path / "eager", model))
    dataset = tmp_path / "eager" / "dataset"
    layout = metrics(_run(tmp_path / "layout", model, dataset, channels_last=True, attention_backend="math"))
    assert all(abs(layout[step] - eager[step]) <= 1e-5 * abs(eager[step]) for step in eager), (layout, eager)

    compiled_out = _run(tmp_path / "compiled", model, dataset, torch_compile=True)
    compiled = metrics(compiled_out)
    assert sorted(compiled) == sorted(eager)
    assert all(abs(compiled[step] - eager[step]) <= COMPILE_TOLERANCE * abs(eager[step]) for step in eager), \
        (compiled, eager)

    resumed_root = tmp_path / "resumed"
    shutil.copytree(compiled_out / "checkpoints" / "step-000002", resumed_root / "output" / "checkpoints" / "step-000002")
    resumed = metrics(_run(resumed_root, model, dataset, torch_compile=True, resume_from_checkpoint="latest"))
    assert sorted(resumed) == [3, 4]
    assert all(resumed[step] == compiled[step] for step in (3, 4)), (resumed, compiled)
    final_a = load_file(compiled_out / "pytorch_lora_weights.safetensors")
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
