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


# ------------------------------------------------------------------ SD3 and Flux (diffusers format)
# comfy/controlnet.py, load_controlnet_state_dict: a state dict with `controlnet_blocks.0.weight` is an SD3 diffusers
# ControlNet when it has `pos_embed_input.proj.weight` (and no `transformer_blocks.0.adaLN_modulation.1.bias`, the
# Stability SD3.5 format): load_controlnet_mmdit; a Flux (InstantX/diffusers) one when it has
# `controlnet_x_embedder.weight` instead: load_controlnet_flux_instantx. Both convert the keys with
# comfy.model_detection.convert_diffusers_mmdit (comfy.utils.mmdit_to_diffusers / flux_to_diffusers, ported below by
# name), then copy every original key beside the converted ones, and load the result into comfy.cldm.mmdit.ControlNet
# / comfy.ldm.flux.controlnet.ControlNetFlux with strict=False: a parameter of that model missing from the result is
# left uninitialised ("missing controlnet keys"), and a key nothing reads is dropped. Names only: ComfyUI derives
# sizes from real models' shapes (SD3: 64 channels per head; Flux: 128), which tiny test models do not have.


def count_blocks(keys: Any, prefix: str) -> int:
    """comfy.model_detection.count_blocks."""
    count = 0
    while any(key.startswith(prefix.format(count)) for key in keys):
        count += 1
    return count


def comfy_controlnet_loader(state_dict: dict[str, Any]) -> str:
    """The branch of load_controlnet_state_dict that takes a diffusers SD3 or Flux ControlNet."""
    assert "controlnet_blocks.0.weight" in state_dict, "ComfyUI would not detect an SD3/Flux ControlNet"
    if "double_blocks.0.img_attn.norm.key_norm.scale" in state_dict:
        return "flux_xlabs_mistoline"
    if "pos_embed_input.proj.weight" in state_dict:
        return "sd35" if "transformer_blocks.0.adaLN_modulation.1.bias" in state_dict else "mmdit"
    if "transformer_blocks.0.img_mlp.net.0.proj.weight" in state_dict:
        return "qwen_instantx"
    return "flux_instantx" if "controlnet_x_embedder.weight" in state_dict else "none"


MMDIT_MAP_BLOCK = {  # comfy.utils.MMDIT_MAP_BLOCK: ComfyUI name -> diffusers name, inside a joint block
    "context_block.adaLN_modulation.1": "norm1_context.linear", "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn2.proj": "attn2.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2"}
MMDIT_MAP_NORMS = {"context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
                   "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
                   "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}
MMDIT_MAP_BASIC = {  # comfy.utils.MMDIT_MAP_BASIC, weights and biases
    "context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out"}
ENDS = ("weight", "bias")


def mmdit_to_diffusers(depth: int, num_blocks: int) -> dict[str, str]:
    """comfy.utils.mmdit_to_diffusers by name: diffusers key -> ComfyUI key (q, k and v land in one qkv)."""
    out: dict[str, str] = {}
    for i in range(num_blocks):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for end in ENDS:
            for name in ("to_q", "to_k", "to_v"):
                out[f"{src}.attn.{name}.{end}"] = f"{dst}.x_block.attn.qkv.{end}"
                out[f"{src}.attn2.{name}.{end}"] = f"{dst}.x_block.attn2.qkv.{end}"
            for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
                out[f"{src}.attn.{name}.{end}"] = f"{dst}.context_block.attn.qkv.{end}"
            for comfy, diffusers in MMDIT_MAP_BLOCK.items():
                out[f"{src}.{diffusers}.{end}"] = f"{dst}.{comfy}.{end}"
        for comfy, diffusers in MMDIT_MAP_NORMS.items():
            out[f"{src}.{diffusers}.weight"] = f"{dst}.{comfy}.weight"
    for comfy, diffusers in MMDIT_MAP_BASIC.items():
        for end in ENDS:
            out[f"{diffusers}.{end}"] = f"{comfy}.{end}"
    out["pos_embed.pos_embed"] = "pos_embed"
    for end in ENDS:  # the base model's last (pre-only) block, through swap_scale_shift
        out[f"transformer_blocks.{depth - 1}.norm1_context.linear.{end}"] = (
            f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{end}")
    return out


FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
FLUX_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                     "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
FLUX_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "norm_out.linear": "final_layer.adaLN_modulation.1", "controlnet_x_embedder": "pos_embed_input"}


def flux_to_diffusers(depth: int, depth_single_blocks: int) -> dict[str, str]:
    """comfy.utils.flux_to_diffusers by name (its LoKr and Flux 2 spellings left out: no diffusers Flux 1 module
    has them)."""
    out: dict[str, str] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for end in ENDS:
            for name in ("to_q", "to_k", "to_v"):
                out[f"{src}.attn.{name}.{end}"] = f"{dst}.img_attn.qkv.{end}"
            for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
                out[f"{src}.attn.{name}.{end}"] = f"{dst}.txt_attn.qkv.{end}"
            for diffusers, comfy in FLUX_DOUBLE.items():
                out[f"{src}.{diffusers}.{end}"] = f"{dst}.{comfy}.{end}"
        for diffusers, comfy in FLUX_DOUBLE_NORMS.items():
            out[f"{src}.{diffusers}.weight"] = f"{dst}.{comfy}.weight"
    for i in range(depth_single_blocks):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for end in ENDS:
            for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
                out[f"{src}.{name}.{end}"] = f"{dst}.linear1.{end}"
            out[f"{src}.norm.linear.{end}"] = f"{dst}.modulation.lin.{end}"
            out[f"{src}.proj_out.{end}"] = f"{dst}.linear2.{end}"
        out[f"{src}.attn.norm_q.weight"] = f"{dst}.norm.query_norm.weight"
        out[f"{src}.attn.norm_k.weight"] = f"{dst}.norm.key_norm.weight"
    for diffusers, comfy in FLUX_BASIC.items():
        for end in ENDS:
            out[f"{diffusers}.{end}"] = f"{comfy}.{end}"
    return out


def _pairs(names: Any) -> set[str]:
    return {f"{name}.{end}" for name in names for end in ENDS}


def comfy_mmdit_controlnet_parameters(loaded: dict[str, Any]) -> set[str]:
    """The state-dict keys of comfy.cldm.mmdit.ControlNet (an MMDiT without its final layer, whose joint blocks are
    all full, plus controlnet_blocks and pos_embed_input) as load_controlnet_mmdit configures it from `loaded`."""
    blocks = count_blocks(loaded, "joint_blocks.{}.")
    rms = "joint_blocks.0.context_block.attn.ln_q.weight" in loaded  # detect_unet_config: qk_norm "rms"
    keys = _pairs(["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "pos_embed_input.proj"])
    keys |= _pairs(["y_embedder.mlp.0", "y_embedder.mlp.2"]) if "y_embedder.mlp.0.weight" in loaded else set()
    keys |= _pairs(["context_embedder"]) if "context_embedder.weight" in loaded else set()
    keys |= {"pos_embed"} if "pos_embed" in loaded else set()  # a buffer when detect_unet_config finds num_patches
    for i in range(blocks):
        attentions = ["attn"] + (["attn2"] if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in loaded else [])
        for part in ("context_block", "x_block"):
            own = attentions if part == "x_block" else ["attn"]
            names = ["adaLN_modulation.1", "mlp.fc1", "mlp.fc2", *[f"{a}.{x}" for a in own for x in ("qkv", "proj")]]
            keys |= _pairs(f"joint_blocks.{i}.{part}.{name}" for name in names)
            if rms:
                keys |= {f"joint_blocks.{i}.{part}.{a}.{n}.weight" for a in own for n in ("ln_q", "ln_k")}
        keys |= _pairs([f"controlnet_blocks.{i}"])
    return keys


def comfy_flux_controlnet_parameters(loaded: dict[str, Any]) -> set[str]:
    """The state-dict keys of comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True) (a Flux model without its
    final layer, plus controlnet_blocks, controlnet_single_blocks and pos_embed_input) as
    load_controlnet_flux_instantx configures it from `loaded` (detect_unet_config's Flux branch)."""
    depth, single = count_blocks(loaded, "double_blocks.{}."), count_blocks(loaded, "single_blocks.{}.")
    top = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
           "pos_embed_input"]
    top += ["guidance_in.in_layer", "guidance_in.out_layer"] if "guidance_in.in_layer.weight" in loaded else []
    keys = _pairs(top)
    for i in range(depth):
        keys |= _pairs(f"double_blocks.{i}.{name}" for name in (
            "img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
            "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"))
        keys |= {f"double_blocks.{i}.{s}_attn.norm.{n}_norm.weight" for s in ("img", "txt") for n in ("query", "key")}
        keys |= _pairs([f"controlnet_blocks.{i}"])
    for i in range(single):
        keys |= _pairs(f"single_blocks.{i}.{name}" for name in ("linear1", "linear2", "modulation.lin"))
        keys |= {f"single_blocks.{i}.norm.{n}_norm.weight" for n in ("query", "key")}
        keys |= _pairs([f"controlnet_single_blocks.{i}"])
    return keys


def convert_diffusers_mmdit_map(state_dict: dict[str, Any]) -> dict[str, str] | None:
    """comfy.model_detection.convert_diffusers_mmdit's choice of key map (None: it converts nothing, and the
    ControlNet loaders that call it then fail)."""
    if "joint_transformer_blocks.0.attn.add_k_proj.weight" in state_dict:
        return {}  # AuraFlow (no ControlNet of ours)
    if "adaln_single.emb.timestep_embedder.linear_1.bias" in state_dict and "pos_embed.proj.bias" in state_dict:
        return {}  # PixArt (no ControlNet of ours)
    if "noise_refiner.0.attention.norm_k.weight" in state_dict:
        return {}  # Z-Image (no ControlNet of ours)
    if "x_embedder.weight" in state_dict:  # Flux
        return flux_to_diffusers(count_blocks(state_dict, "transformer_blocks.{}."),
                                 count_blocks(state_dict, "single_transformer_blocks.{}."))
    if "transformer_blocks.0.attn.add_q_proj.weight" in state_dict and "pos_embed.proj.weight" in state_dict:  # SD3
        return mmdit_to_diffusers(state_dict["pos_embed.proj.weight"].shape[0] // 64,
                                  count_blocks(state_dict, "transformer_blocks.{}."))
    return None


def comfy_transformer_controlnet_keys(state_dict: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(loader branch, ComfyUI parameters the loaded state dict lacks, keys of the file nothing reads)."""
    branch = comfy_controlnet_loader(state_dict)
    key_map = convert_diffusers_mmdit_map(state_dict) if branch in ("mmdit", "flux_instantx") else None
    if key_map is None:
        return branch, [], []
    # convert_diffusers_mmdit pops what it converts; the loader then copies what is left under its own name
    loaded = {key_map[k]: v for k, v in state_dict.items() if k in key_map}
    loaded.update({k: v for k, v in state_dict.items() if k not in key_map})
    expected = (comfy_mmdit_controlnet_parameters if branch == "mmdit" else comfy_flux_controlnet_parameters)(loaded)
    missing = sorted(expected - set(loaded))
    unread = sorted(k for k in state_dict if k not in key_map and k not in expected)
    return branch, missing, unread
