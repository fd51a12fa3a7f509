"""ComfyUI's key handling for diffusers-format ControlNets, ported for tests (consumer's code as a check).

From Comfy-Org/ComfyUI:
- comfy/controlnet.py, `load_controlnet_state_dict`: a state dict with `controlnet_cond_embedding.conv_in.weight`
  is diffusers format; its keys map through `comfy.utils.unet_to_diffusers(controlnet_config)` plus
  `controlnet_mid_block.* -> middle_block_out.0.*`, `controlnet_down_blocks.N.* -> zero_convs.N.0.*` and
  `controlnet_cond_embedding.{conv_in, blocks.N, conv_out}.* -> input_hint_block.{2i}.*`; what maps nothing is
  logged as "leftover keys" (and never loaded).
- comfy/utils.py, `unet_to_diffusers`: the port in tests/ui_loaders.py (the LoRA checks use it too).
ComfyUI finds `controlnet_config` by matching shapes against the UNets it knows
(`comfy.model_detection.unet_config_from_diffusers_unet`); tiny test models match none, so
`unet_config_of` builds the same fields from the ControlNet's own diffusers config.
"""

from __future__ import annotations

from typing import Any

from ui_loaders import unet_to_diffusers

def unet_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's unet_config fields that unet_to_diffusers reads, from a diffusers ControlNet config."""
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    depth = [depth] * blocks if isinstance(depth, int) else list(depth)
    cross = ["CrossAttn" in name for name in config["down_block_types"]]
    per_block = [depth[i] if cross[i] else 0 for i in range(blocks) for _ in range(layers)]
    return {"num_res_blocks": [layers] * blocks, "channel_mult": [1] * blocks, "transformer_depth": per_block,
            "transformer_depth_output": [0] * (blocks * (layers + 1)), "transformer_depth_middle": depth[-1]}


def comfy_controlnet_keys(state_dict: dict[str, Any], unet_config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """load_controlnet_state_dict's diffusers branch: (diffusers key -> ComfyUI key, leftover keys)."""
    assert "controlnet_cond_embedding.conv_in.weight" in state_dict, "ComfyUI would not detect a diffusers ControlNet"
    keys = unet_to_diffusers(unet_config)
    keys["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    keys["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    count, loop = 0, True
    while loop:
        for s in [".weight", ".bias"]:
            k_in = f"controlnet_down_blocks.{count}{s}"
            if k_in not in state_dict:
                loop = False
                break
            keys[k_in] = f"zero_convs.{count}.0{s}"
        count += 1
    count, loop = 0, True
    while loop:
        for s in [".weight", ".bias"]:
            k_in = f"controlnet_cond_embedding.conv_in{s}" if count == 0 else \
                f"controlnet_cond_embedding.blocks.{count - 1}{s}"
            k_out = f"input_hint_block.{count * 2}{s}"
            if k_in not in state_dict:
                k_in = f"controlnet_cond_embedding.conv_out{s}"
                loop = False
            keys[k_in] = k_out
        count += 1
    mapped = {k: keys[k] for k in keys if k in state_dict}
    leftover = sorted(set(state_dict) - set(mapped))
    return mapped, leftover
