"""The configuration path of sharded training: deepspeed_config read and checked, plugins built, bad input refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from simpletuner.config.load import load_config
from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError, UserError
from simpletuner.train.sharding import accelerator_plugins, deepspeed_settings, fsdp_plugin

BASE = {"model_family": "sdxl", "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        "model_type": "full"}
ZERO2_OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}},
                 "bf16": {"enabled": True}}


def _config(tmp_path, **options) -> TrainingConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **options}))
    return load_config(path)


def _refused(tmp_path, **options) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, **options)
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2
    return str(caught.value)


@pytest.mark.parametrize("form", ["file", "inline", "mapping"])
def test_deepspeed_config_from_a_file_inline_json_or_a_mapping_becomes_the_plugin(tmp_path, form):
    pytest.importorskip("deepspeed")
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(ZERO2_OFFLOAD))
    value = {"file": str(file), "inline": json.dumps(ZERO2_OFFLOAD), "mapping": ZERO2_OFFLOAD}[form]
    cfg = _config(tmp_path, deepspeed_config=value, train_batch_size=3, max_grad_norm=0.5, mixed_precision="bf16",
                  gradient_accumulation_steps=2)

    plugin = accelerator_plugins(cfg)["deepspeed_plugin"]
    assert plugin.zero_stage == 2
    assert plugin.offload_optimizer_device == "cpu"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 2


def test_zero3_with_parameter_offload_and_the_run_s_values_filled_in(tmp_path):
    config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                    "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
              "train_batch_size": 64, "gradient_clipping": "auto"}
    cfg = _config(tmp_path, deepspeed_config=json.dumps(config), grad_clip_method="value")
    settings = deepspeed_settings(cfg)
    assert settings["zero_optimization"]["stage"] == 3
    assert "train_batch_size" not in settings  # DeepSpeed derives it from micro batch x accumulation x processes
    assert settings["gradient_clipping"] == 0.0  # clipping by value is the trainer's, not DeepSpeed's norm


@pytest.mark.parametrize(("value", "phrase"), [
    ("{not json", "inline JSON is not valid JSON"),
    ("missing/ds.json", "no such file"),
    (json.dumps({"zero_optimization": {"stage": 4}}), "stage=4 is not a ZeRO stage; accepted: 1, 2 or 3"),
    (json.dumps({"train_batch_size": 8}), "zero_optimization.stage is missing"),
    (json.dumps([1, 2]), "must hold a JSON object"),
    (json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}),
     "offload_optimizer.device='gpu'"),
    (json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}), "needs ZeRO stage 3"),
])
def test_a_malformed_deepspeed_config_is_refused_naming_the_option(tmp_path, value, phrase):
    message = _refused(tmp_path, deepspeed_config=value)
    assert "deepspeed_config" in message and phrase in message


def test_a_deepspeed_file_with_bad_json_names_the_file(tmp_path):
    file = tmp_path / "ds.json"
    file.write_text('{"zero_optimization": {"stage": 2,}}')
    message = _refused(tmp_path, deepspeed_config=str(file))
    assert str(file) in message and "not valid JSON" in message


@pytest.mark.parametrize(("options", "phrase"), [
    ({"fsdp_enable": True, "deepspeed_config": json.dumps(ZERO2_OFFLOAD)},
     "FSDP and DeepSpeed cannot be enabled simultaneously"),
    ({"fsdp_enable": True, "model_type": "lora"}, "fsdp_enable=true needs model_type 'full'"),
    ({"fsdp_enable": True, "fsdp_version": 1}, "only FSDP2 (fsdp_version=2) is built"),
    ({"deepspeed_config": json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
      "use_ema": True}, "use_ema=true with zero_optimization.offload_param.device 'nvme'"),
    ({"fsdp_enable": True, "fsdp_state_dict_type": "LOCAL_STATE_DICT"}, "SHARDED_STATE_DICT"),
    ({"fsdp_enable": True, "train_text_encoder": True}, "train_text_encoder=true with fsdp_enable=true"),
    ({"deepspeed_config": json.dumps(ZERO2_OFFLOAD), "train_text_encoder": True},
     "train_text_encoder=true with deepspeed_config"),
])
def test_combinations_that_cannot_train_are_refused(tmp_path, options, phrase):
    assert phrase in _refused(tmp_path, **options)


def test_fsdp_and_deepspeed_together_exit_2_at_config_check(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "fsdp_enable": True, "deepspeed_config": json.dumps(ZERO2_OFFLOAD),
                                "output_dir": str(tmp_path / "out")}))
    done = subprocess.run([sys.executable, "-m", "simpletuner", "config", "check", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "FSDP and DeepSpeed cannot be enabled simultaneously" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_the_fsdp_options_become_accelerate_s_fsdp2_plugin(tmp_path):
    cfg = _config(tmp_path, fsdp_enable=True, fsdp_reshard_after_forward=False, fsdp_state_dict_type="FULL_STATE_DICT",
                  fsdp_cpu_ram_efficient_loading=True, fsdp_transformer_layer_cls_to_wrap="BasicTransformerBlock, "
                  "ResnetBlock2D")
    plugin = fsdp_plugin(cfg)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock", "ResnetBlock2D"]


def test_fsdp_options_without_fsdp_enable_are_ignored_with_a_warning(tmp_path, caplog):
    cfg = _config(tmp_path, fsdp_reshard_after_forward=False, fsdp_transformer_layer_cls_to_wrap="Block")
    with caplog.at_level(logging.WARNING):
        assert accelerator_plugins(cfg) == {}
    assert "fsdp_reshard_after_forward, fsdp_transformer_layer_cls_to_wrap set without fsdp_enable" in caplog.text
