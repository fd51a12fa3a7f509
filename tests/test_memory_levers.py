"""Cheap memory levers: checkpointing every n-th block gives the same loss and gradients while keeping
fewer activations than none; ema_cpu_only keeps the EMA on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import flux_inputs

from simpletuner.config.load import load_config
from simpletuner.errors import ConfigError
from simpletuner.train.checkpointing import EveryNthBlock, enable_checkpointing


def _transformer(tiny_model):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model("flux"), subfolder="transformer")
    return model.float().train()


def _step(model, interval: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and tensors kept for backward of one forward/backward on a fixed batch."""
    function = enable_checkpointing(model, interval) if interval else None
    inputs = flux_inputs(model)
    kept = 0

    def pack(tensor):
        nonlocal kept
        kept += 1
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).sample.pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if function is not None:
        blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        assert function.checkpointed == -(-blocks // interval)  # blocks 0, n, 2n, ...
    return loss.detach(), grads, kept


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_every_nth_block_gives_the_same_loss_and_gradients(tiny_model, interval: int) -> None:
    loss, grads, kept_plain = _step(_transformer(tiny_model), None)
    model = _transformer(tiny_model)
    loss_n, grads_n, kept_n = _step(model, interval)
    torch.testing.assert_close(loss_n, loss)
    assert grads.keys() == grads_n.keys()
    for name in grads:
        torch.testing.assert_close(grads_n[name], grads[name], rtol=1e-5, atol=1e-6)
    assert kept_n < kept_plain  # checkpointed blocks keep only their inputs
    if interval > 1:
        _, _, kept_every = _step(_transformer(tiny_model), 1)
        assert kept_every < kept_n  # checkpointing fewer blocks keeps more


def test_the_block_count_restarts_every_forward() -> None:
    function = EveryNthBlock(2)
    layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2, requires_grad=True)
    for _ in range(3):
        function.reset()
        for _ in range(3):
            function(layer, x)
    assert function.checkpointed == 6  # calls 0 and 2 of each of three passes


def test_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EveryNthBlock(0)


def _config(tmp_path: Path, **options) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "sdxl", "pretrained_model_name_or_path": "x",
                                "data_backend_config": "d.json", "output_dir": "o", **options}))
    return path


def test_ema_cpu_only_keeps_the_ema_on_the_cpu(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path, ema_cpu_only=True, use_ema=True)).ema_device == "cpu"
    with pytest.raises(ConfigError, match="ema_cpu_only=true keeps the EMA on the CPU"):
        load_config(_config(tmp_path, ema_cpu_only=True, ema_device="accelerator"))


def test_gradient_checkpointing_interval_is_an_option(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_interval=2))
    assert cfg.gradient_checkpointing_interval == 2
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval"):
        load_config(_config(tmp_path, gradient_checkpointing_interval=0))


def _cfg(tiny_model, family: str = "flux", **options):
    from simpletuner.config.schema import TrainingConfig

    return TrainingConfig(model_family=family, pretrained_model_name_or_path=str(tiny_model(family)),
                          data_backend_config="d.json", output_dir="o", **options)


def _components(tiny_model, family: str = "flux"):
    from simpletuner.models.registry import get_family

    return get_family(family).load(_cfg(tiny_model, family))


def _data(reencode: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(datasets={"images": SimpleNamespace(reencode_each_epoch=reencode)})


def test_text_encoders_and_the_vae_are_parked_once_the_caches_are_complete(tiny_model) -> None:
    from simpletuner.train.offload import park_encoders

    components = _components(tiny_model)
    parked = park_encoders(components, _data(), torch.device("cpu"), _cfg(tiny_model))
    assert sorted(parked.names) == ["text_encoder", "text_encoder_2", "vae"]
    assert all(p.device.type == "cpu" for name in parked.names for p in components[name].parameters())
    assert "transformer" not in parked.names  # the denoiser stays where the step runs


@pytest.mark.parametrize("on_demand, reencode", [(True, False), (False, True)])
def test_the_vae_stays_when_training_encodes_latents(tiny_model, on_demand, reencode) -> None:
    from simpletuner.train.offload import park_encoders

    parked = park_encoders(_components(tiny_model), _data(reencode), torch.device("cpu"),
                           _cfg(tiny_model, vae_cache_ondemand=on_demand))
    assert sorted(parked.names) == ["text_encoder", "text_encoder_2"]


def test_text_encoders_that_train_stay_on_the_device(tiny_model) -> None:
    from simpletuner.train.offload import park_encoders

    cfg = _cfg(tiny_model, "sd1x", train_text_encoder=True)
    parked = park_encoders(_components(tiny_model, "sd1x"), _data(), torch.device("cpu"), cfg)
    assert parked.names == ["vae"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parked_encoders_come_to_the_device_only_for_validation(tiny_model) -> None:
    from simpletuner.train.offload import park_encoders

    components = _components(tiny_model).to("cuda")
    parked = park_encoders(components, _data(), torch.device("cuda"), _cfg(tiny_model))
    assert next(components["text_encoder"].parameters()).device.type == "cpu"
    assert next(components["transformer"].parameters()).device.type == "cuda"
    with parked.on_device():
        assert all(next(components[n].parameters()).device.type == "cuda" for n in parked.names)
    assert all(next(components[n].parameters()).device.type == "cpu" for n in parked.names)
