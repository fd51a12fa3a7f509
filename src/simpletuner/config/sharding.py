"""Sharded training settings: FSDP2 options and the DeepSpeed config, read and checked without a model.

`deepspeed_config` is what SimpleTuner accepts: a path to a DeepSpeed JSON file, the JSON inline
as text, or a mapping (from a TOML/JSON configuration). It must name a ZeRO stage 1, 2 or 3 in
`zero_optimization.stage`; optimiser offload is DeepSpeed's own `zero_optimization.offload_optimizer`.
Errors are ValueErrors naming the option, turned into exit-2 configuration errors by the schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ZERO_STAGES = (1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
# options that mean something only with fsdp_enable
FSDP_OPTIONS = ("fsdp_version", "fsdp_reshard_after_forward", "fsdp_state_dict_type", "fsdp_cpu_ram_efficient_loading",
                "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap")


def read_deepspeed_config(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config `value` names (file path, inline JSON or mapping), checked."""
    if isinstance(value, Mapping):
        config = dict(value)
    else:
        text = value.strip()
        if text.startswith(("{", "[")):
            config = _parse(text, "inline JSON")
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise ValueError(f"deepspeed_config={value!r}: no such file; give a DeepSpeed JSON file or the JSON "
                                 "inline (starting with '{')")
            config = _parse(path.read_text(), f"file {path}")
    check_deepspeed_config(config)
    return config


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"deepspeed_config: {where} is not valid JSON ({error.msg} at line {error.lineno} "
                         f"column {error.colno})") from error
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed_config: {where} must hold a JSON object, not {type(config).__name__}")
    return config


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Refuse what cannot train here: no ZeRO stage 1-3, or an unknown optimiser offload device."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, Mapping) or "stage" not in zero:
        raise ValueError("deepspeed_config: zero_optimization.stage is missing; accepted: 1, 2 or 3 (ZeRO stages)")
    stage = zero["stage"]
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed_config: zero_optimization.stage={stage!r} is not a ZeRO stage; accepted: 1, 2 "
                         "or 3")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if offload is None:
            continue
        device = offload.get("device", "none") if isinstance(offload, Mapping) else offload
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"deepspeed_config: zero_optimization.{key}.device={device!r}; accepted: "
                             f"{', '.join(OFFLOAD_DEVICES)}")
    if zero.get("offload_param") and stage != 3:
        raise ValueError(f"deepspeed_config: zero_optimization.offload_param needs ZeRO stage 3 (got stage {stage}); "
                         "use offload_optimizer at stages 1 and 2")


def zero_stage(config: Mapping[str, Any]) -> int:
    return int(config["zero_optimization"]["stage"])


def offload_device(config: Mapping[str, Any], key: str) -> str:
    """Where DeepSpeed's `key` (offload_optimizer, offload_param) puts its tensors: 'none', 'cpu' or 'nvme'."""
    offload = config["zero_optimization"].get(key) or {}
    return offload.get("device", "none") if isinstance(offload, Mapping) else str(offload)


def sharding_problems(cfg: Any) -> list[str]:
    """What cannot be combined with the sharding asked for (one line each)."""
    problems: list[str] = []
    if cfg.fsdp_enable and cfg.deepspeed_config:
        problems.append("fsdp_enable=true and deepspeed_config are both set: FSDP and DeepSpeed cannot be enabled "
                        "simultaneously; remove deepspeed_config or set fsdp_enable=false")
    if cfg.fsdp_enable and cfg.model_type != "full":
        problems.append(f"fsdp_enable=true needs model_type 'full' (got {cfg.model_type!r}): FSDP shards a full "
                        "fine-tune; adapters train unsharded")
    if cfg.fsdp_enable and cfg.fsdp_version != 2:
        problems.append(f"fsdp_version={cfg.fsdp_version}: only FSDP2 (fsdp_version=2) is built; FSDP1 is deprecated "
                        "upstream")
    if cfg.train_text_encoder and (cfg.fsdp_enable or cfg.deepspeed_config):
        sharding = "fsdp_enable=true" if cfg.fsdp_enable else "deepspeed_config"
        problems.append(f"train_text_encoder=true with {sharding} is not built yet: a sharded checkpoint holds the "
                        "sharded module only, so the trained text encoders would not be saved; remove one of them")
    if cfg.deepspeed_config and cfg.use_ema and _parameter_offload(cfg.deepspeed_config) == "nvme":
        problems.append("use_ema=true with zero_optimization.offload_param.device 'nvme': the EMA averages each "
                        "process's partition of the weights, which would lie on NVMe; offload the parameters to "
                        "'cpu' or set use_ema=false")
    return problems


def _parameter_offload(value: Any) -> str | None:
    """Where `deepspeed_config` offloads ZeRO-3's parameters; None when it cannot be read (reported on its own)."""
    try:
        return offload_device(read_deepspeed_config(value), "offload_param")
    except ValueError:
        return None
