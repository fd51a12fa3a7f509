"""ComfyUI's key handling for diffusers-format ControlNets, ported for tests (consumer's code as a check).

From Comfy-Org/ComfyUI:
- comfy/controlnet.py, `load_controlnet_state_dict`: a state dict with `controlnet_cond_embedding.conv_in.weight`
  is diffusers format; its keys map through `comfy.utils.unet_to_diffusers(controlnet_config)` plus
  `controlnet_mid_block.* -> middle_block_out.0.*`, `controlnet_down_blocks.N.* -> zero_convs.N.0.*` and
  `controlnet_cond_embedding.{conv_in, blocks.N, conv_out}.* -> input_hint_block.{2i}.*`; what maps nothing is
  logged as "leftover keys" (and never loaded).
- comfy/utils.py, `unet_to_diffusers` with UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_RESNET, UNET_MAP_BASIC.
ComfyUI finds `controlnet_config` by matching shapes against the UNets it knows
(`comfy.model_detection.unet_config_from_diffusers_unet`); tiny test models match none, so
`unet_config_of` builds the same fields from the ControlNet's own diffusers config.
"""

from __future__ import annotations

from typing import Any

UNET_MAP_ATTENTIONS = {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight",
                       "norm.bias"}
TRANSFORMER_BLOCKS = {
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
}
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
UNET_MAP_BASIC = {
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"), ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"), ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
}


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


def unet_to_diffusers(unet_config: dict[str, Any]) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers: diffusers UNet key -> ComfyUI (ldm) key."""
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(channel_mult)
    transformers_mid = unet_config.get("transformer_depth_middle", None)
    mapping: dict[str, str] = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                mapping[f"down_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"input_blocks.{n}.0.{b}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    mapping[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        mapping[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        for k in ["weight", "bias"]:
            mapping[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    i = 0
    for b in UNET_MAP_ATTENTIONS:
        mapping[f"mid_block.attentions.{i}.{b}"] = f"middle_block.1.{b}"
    for t in range(transformers_mid):
        for b in TRANSFORMER_BLOCKS:
            mapping[f"mid_block.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            mapping[f"mid_block.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"middle_block.{n}.{b}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in UNET_MAP_RESNET:
                mapping[f"up_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"output_blocks.{n}.0.{b}"
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    mapping[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        mapping[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == length - 1:
                for k in ["weight", "bias"]:
                    mapping[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    for k in UNET_MAP_BASIC:
        mapping[k[1]] = k[0]
    return mapping


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
