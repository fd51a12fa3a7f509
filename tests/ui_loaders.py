"""The LoRA key matching and weight arithmetic of ComfyUI and A1111, re-implemented for the tests.

Each function below reproduces one piece of the consumers' code (read with the search tool's
read_file, December 2026), cited by file and function:

ComfyUI (repo Comfy-Org/ComfyUI):
- comfy/utils.py `unet_to_diffusers` (-> `unet_to_diffusers`), `mmdit_to_diffusers`,
  `flux_to_diffusers`, `pixart_to_diffusers` (-> `transformer_to_diffusers`; only the `.weight`
  entries, which are all `model_lora_keys_unet` keeps);
- comfy/ldm/hydit/models.py `HunYuanDiTBlock` and comfy/ldm/hydit/attn_layers.py `Attention`
  (`Wqkv`, reshaped to (3, heads, head_dim): rows q, k, v) and `CrossAttention` (`q_proj`; `kv_proj`,
  viewed as (2, heads, head_dim): rows k, v) (-> `hunyuan_dit_to_diffusers`: ComfyUI's Hunyuan-DiT
  weights, for diffusers' HunyuanDiT2DModel modules);
- comfy/lora.py `model_lora_keys_unet` (-> `comfy_unet_key_map`; its HunyuanDiT branch ->
  `comfy_hunyuan_dit_key_map`), `model_lora_keys_clip`
  (-> `comfy_clip_key_map`), `load_lora` (-> `comfy_load_lora`), `calculate_weight` (offset
  narrowing, -> `comfy_patched_weight`);
- comfy/lora_convert.py `convert_lora` (-> `comfy_convert_lora_changes`: which files it rewrites);
- comfy/weight_adapter/lora.py `LoRAAdapter.load` and `LoRAAdapter.calculate_weight`, and
  comfy/weight_adapter/base.py `weight_decompose` (-> `comfy_patched_weight`).
A1111 (repo AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora):
- networks.py `convert_diffusers_name_to_compvis`, `assign_network_names_to_compvis_modules`
  (-> `a1111_layer_names`), `load_network` (-> `a1111_load_network`);
- network.py `NetworkModule.calc_scale` / `finalize_updown` and network_lora.py `calc_updown`
  (-> `a1111_delta`: up @ down * alpha / dim * multiplier).

The consumers' model state-dict names come from the same ComfyUI maps (the LDM names are the values
of `unet_to_diffusers`), so each diffusers module knows the weight (and offset) it lands on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Target = tuple[str, tuple[int, int, int] | None]  # (model weight key, (dim, start, length) or None)

# ------------------------------------------------------------------ comfy/utils.py
UNET_MAP_ATTENTIONS = ("proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight",
                       "norm.bias")
TRANSFORMER_BLOCKS = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
UNET_MAP_BASIC = (
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
)


def comfy_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers UNet config as ComfyUI's unet_config (num_res_blocks, channel_mult, transformer_depth,
    transformer_depth_output (highest resolution first, as ComfyUI's model detection writes it),
    transformer_depth_middle)."""
    kinds = config["down_block_types"]
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(kinds)
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(kinds)
    attends = ["CrossAttn" in kind for kind in kinds]
    level = [depth[i] if attends[i] else 0 for i in range(len(kinds))]
    return {"num_res_blocks": layers, "channel_mult": [1] * len(kinds),
            "transformer_depth": [d for i, d in enumerate(level) for _ in range(layers[i])],
            "transformer_depth_output": [d for i, d in enumerate(level) for _ in range(layers[i] + 1)],
            "transformer_depth_middle": depth[-1] if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else -1}


def unet_to_diffusers(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers: diffusers UNet key -> LDM key (weights and biases, as ComfyUI maps
    them; its LoRA key maps keep the weights only: `unet_weights_to_diffusers`)."""
    num_res_blocks = list(unet_config["num_res_blocks"])
    transformer_depth = list(unet_config["transformer_depth"])
    transformer_depth_output = list(unet_config["transformer_depth_output"])
    num_blocks = len(unet_config["channel_mult"])
    out: dict[str, str] = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b, d in UNET_MAP_RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{b}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    out[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}")
            n += 1
        for k in ("weight", "bias"):
            out[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    for b in UNET_MAP_ATTENTIONS:
        out[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(unet_config["transformer_depth_middle"]):
        for b in TRANSFORMER_BLOCKS:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b, d in UNET_MAP_RESNET.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{b}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b, d in UNET_MAP_RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{b}"
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    out[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}")
            if i == length - 1:
                for k in ("weight", "bias"):
                    out[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    for ldm, diffusers in UNET_MAP_BASIC:
        out[diffusers] = ldm
    return out


def _qkv(out: dict, source: str, names: tuple[str, str, str], target: str, size: int) -> None:
    for index, name in enumerate(names):
        out[f"{source}{name}.weight"] = (target, (0, size * index, size))


def transformer_to_diffusers(family: str, settings: Mapping[str, int], prefix: str = "diffusion_model.") -> dict:
    """comfy/utils.py mmdit_to_diffusers (sd3: depth), flux_to_diffusers (flux: depth, depth_single_blocks,
    hidden_size), pixart_to_diffusers (pixart: depth, hidden_size): diffusers key -> model key or
    (model key, offset)."""
    out: dict[str, Any] = {}
    if family == "sd3":
        depth = settings["depth"]
        offset = depth * 64
        block_map = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out":
                     "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                     "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
                     "attn.to_out.0": "x_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                     "ff.net.2": "x_block.mlp.fc2"}
        for i in range(depth):
            src, dst = f"transformer_blocks.{i}.attn.", f"{prefix}joint_blocks.{i}"
            _qkv(out, src, ("to_q", "to_k", "to_v"), f"{dst}.x_block.attn.qkv.weight", offset)
            _qkv(out, src, ("add_q_proj", "add_k_proj", "add_v_proj"), f"{dst}.context_block.attn.qkv.weight", offset)
            for d, c in block_map.items():
                out[f"transformer_blocks.{i}.{d}.weight"] = f"{dst}.{c}.weight"
        for c, d in (("context_embedder", "context_embedder"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder"
                     ".linear_1"), ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                     ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                     ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                     ("final_layer.linear", "proj_out")):
            out[f"{d}.weight"] = f"{prefix}{c}.weight"
        # the last block's norm1_context goes through swap_scale_shift (a function, not a plain key)
        out[f"transformer_blocks.{depth - 1}.norm1_context.linear.weight"] = (
            f"{prefix}joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight", None, "swap_scale_shift")
    elif family == "flux":
        hidden = settings["hidden_size"]
        block_map = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear":
                     "txt_mod.lin", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                     "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
        for i in range(settings["depth"]):
            src, dst = f"transformer_blocks.{i}.attn.", f"{prefix}double_blocks.{i}"
            _qkv(out, src, ("to_q", "to_k", "to_v"), f"{dst}.img_attn.qkv.weight", hidden)
            _qkv(out, src, ("add_q_proj", "add_k_proj", "add_v_proj"), f"{dst}.txt_attn.qkv.weight", hidden)
            for d, c in block_map.items():
                out[f"transformer_blocks.{i}.{d}.weight"] = f"{dst}.{c}.weight"
        for i in range(settings["depth_single_blocks"]):
            src, dst = f"single_transformer_blocks.{i}", f"{prefix}single_blocks.{i}"
            _qkv(out, f"{src}.attn.", ("to_q", "to_k", "to_v"), f"{dst}.linear1.weight", hidden)
            out[f"{src}.proj_mlp.weight"] = (f"{dst}.linear1.weight", (0, hidden * 3, hidden * 4))
            out[f"{src}.norm.linear.weight"] = f"{dst}.modulation.lin.weight"
            out[f"{src}.proj_out.weight"] = f"{dst}.linear2.weight"
        for c, d in (("final_layer.linear", "proj_out"), ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                     ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
            out[f"{d}.weight"] = f"{prefix}{c}.weight"
    elif family == "pixart":
        offset = settings.get("hidden_size", 1152)
        for i in range(settings["depth"]):
            src, dst = f"transformer_blocks.{i}", f"{prefix}blocks.{i}"
            _qkv(out, f"{src}.attn1.", ("to_q", "to_k", "to_v"), f"{dst}.attn.qkv.weight", offset)
            out[f"{src}.attn2.to_q.weight"] = f"{dst}.cross_attn.q_linear.weight"
            out[f"{src}.attn2.to_k.weight"] = (f"{dst}.cross_attn.kv_linear.weight", (0, 0, offset))
            out[f"{src}.attn2.to_v.weight"] = (f"{dst}.cross_attn.kv_linear.weight", (0, offset, offset))
            for c, d in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
                         ("cross_attn.proj", "attn2.to_out.0")):
                out[f"{src}.{d}.weight"] = f"{dst}.{c}.weight"
    else:
        raise ValueError(family)
    return out


def hunyuan_dit_to_diffusers(depth: int, hidden_size: int, prefix: str = "diffusion_model.") -> dict[str, Target]:
    """ComfyUI's Hunyuan-DiT model (comfy/ldm/hydit): diffusers module weight of HunyuanDiT2DModel ->
    (ComfyUI's weight, offset of the module's rows in it)."""
    out: dict[str, Target] = {}
    for i in range(depth):
        src, dst = f"blocks.{i}", f"{prefix}blocks.{i}"  # diffusers names its block list `blocks` as well
        for index, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{src}.attn1.{name}.weight"] = (f"{dst}.attn1.Wqkv.weight", (0, hidden_size * index, hidden_size))
        for index, name in enumerate(("to_k", "to_v")):
            out[f"{src}.attn2.{name}.weight"] = (f"{dst}.attn2.kv_proj.weight", (0, hidden_size * index, hidden_size))
        for d, c in (("attn1.to_out.0", "attn1.out_proj"), ("attn2.to_q", "attn2.q_proj"),
                     ("attn2.to_out.0", "attn2.out_proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                     ("norm1.linear", "default_modulation.1")):
            out[f"{src}.{d}.weight"] = (f"{dst}.{c}.weight", None)
        if i > depth // 2:  # HunYuanDiT: skip=layer > depth // 2
            out[f"{src}.skip_linear.weight"] = (f"{dst}.skip_linear.weight", None)
    return out


# ------------------------------------------------------------------ comfy/lora.py
def comfy_hunyuan_dit_key_map(model_keys: set[str]) -> dict[str, Target]:
    """model_lora_keys_unet's HunyuanDiT branch: base_model.model.<the model's own name> ("official hunyuan
    lora format"), for every diffusion_model.*.weight key of the model's state dict."""
    return {f"base_model.model.{k[len('diffusion_model.'):-len('.weight')]}": (k, None) for k in sorted(model_keys)
            if k.startswith("diffusion_model.") and k.endswith(".weight")}


def unet_weights_to_diffusers(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """`unet_to_diffusers` for LoRA keys: ComfyUI's model_lora_keys_unet keeps `k.endswith(".weight")` only."""
    return {k: v for k, v in unet_to_diffusers(unet_config).items() if k.endswith(".weight")}


def comfy_unet_key_map(unet_config: Mapping[str, Any]) -> dict[str, Target]:
    """model_lora_keys_unet for a UNet model: kohya names from the model's own (LDM) keys, kohya names
    of the diffusers keys, simpletuner lycoris names, diffusers `.processor.` names."""
    diffusers_keys = unet_weights_to_diffusers(unet_config)
    key_map: dict[str, Target] = {}
    for ldm in diffusers_keys.values():  # the model's state dict: diffusion_model.<LDM key>
        key = f"diffusion_model.{ldm}"
        key_map["lora_unet_" + ldm[: -len(".weight")].replace(".", "_")] = (key, None)
        key_map[key[: -len(".weight")]] = (key, None)
    for k, ldm in diffusers_keys.items():
        unet_key = (f"diffusion_model.{ldm}", None)
        base = k[: -len(".weight")]
        key_map["lora_unet_" + base.replace(".", "_")] = unet_key
        key_map["lycoris_" + base.replace(".", "_")] = unet_key
        for p in ("", "unet."):
            name = p + base.replace(".to_", ".processor.to_")
            key_map[name[:-2] if name.endswith(".to_out.0") else name] = unet_key
    return key_map


def comfy_transformer_key_map(family: str, settings: Mapping[str, int]) -> dict[str, Target]:
    """model_lora_keys_unet's SD3, PixArt and Flux branches: transformer.<diffusers> (and their other names)."""
    key_map: dict[str, Target] = {}
    for k, to in transformer_to_diffusers(family, settings).items():
        target: Target = (to, None) if isinstance(to, str) else (to[0], to[1]) if len(to) == 2 else (to[0], "fn")
        base = k[: -len(".weight")]
        key_map[f"transformer.{base}"] = target
        key_map[f"base_model.model.{base}"] = target
        if family in ("sd3", "flux"):
            key_map["lora_transformer_" + base.replace(".", "_")] = target
            key_map["lycoris_" + base.replace(".", "_")] = target
    return key_map


_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


def comfy_clip_key_map(sdk: set[str]) -> dict[str, Target]:
    """model_lora_keys_clip: kohya text-encoder names for clip_l / clip_h / clip_g and t5xxl.
    `sdk`: the text model's state-dict keys (clip_l.transformer.text_model..., t5xxl.transformer.encoder...)."""
    key_map: dict[str, Target] = {}
    clip_l_present = clip_g_present = False
    for b in range(32):
        for c, lora in _LORA_CLIP_MAP.items():
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                for name in (f"lora_te_text_model_encoder_layers_{b}_{lora}",
                             f"lora_te1_text_model_encoder_layers_{b}_{lora}", f"text_encoder.text_model.encoder."
                             f"layers.{b}.{c}"):
                    key_map[name] = (k, None)
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                for name in (f"lora_te_text_model_encoder_layers_{b}_{lora}",
                             f"lora_te1_text_model_encoder_layers_{b}_{lora}",
                             f"text_encoder.text_model.encoder.layers.{b}.{c}"):
                    key_map[name] = (k, None)
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                clip_g_present = True
                names = ((f"lora_te2_text_model_encoder_layers_{b}_{lora}",
                          f"text_encoder_2.text_model.encoder.layers.{b}.{c}") if clip_l_present else
                         (f"lora_te_text_model_encoder_layers_{b}_{lora}",
                          f"text_encoder.text_model.encoder.layers.{b}.{c}"))
                for name in names:
                    key_map[name] = (k, None)
    for k in sorted(sdk):
        if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
            l_key = k[len("t5xxl.transformer."):-len(".weight")]
            t5_index = 1 + clip_g_present
            if clip_l_present:
                t5_index += 1
                if t5_index == 2:
                    key_map[f"lora_te{t5_index}_{l_key.replace('.', '_')}"] = (k, None)
                    t5_index += 1
            key_map[f"lora_te{t5_index}_{l_key.replace('.', '_')}"] = (k, None)
    return key_map


@dataclass
class ComfyPatch:
    up: Tensor
    down: Tensor
    alpha: float | None
    dora_scale: Tensor | None
    offset: tuple[int, int, int] | None


def comfy_load_lora(lora: Mapping[str, Tensor], key_map: Mapping[str, Target]) -> tuple[dict[str, ComfyPatch],
                                                                                          list[str]]:
    """load_lora + LoRAAdapter.load: the patches per model weight, and the file's keys not loaded
    (ComfyUI logs "lora key not loaded" for each)."""
    patches: dict[str, ComfyPatch] = {}
    loaded: set[str] = set()
    for x, (target, offset) in key_map.items():
        alpha = dora = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        if f"{x}.dora_scale" in lora:
            dora = lora[f"{x}.dora_scale"]
            loaded.add(f"{x}.dora_scale")
        for up_name, down_name in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                                   (f"{x}_lora.up.weight", f"{x}_lora.down.weight"),
                                   (f"{x}.lora_B.weight", f"{x}.lora_A.weight"),
                                   (f"{x}.lora.up.weight", f"{x}.lora.down.weight")):
            if up_name in lora:
                assert offset != "fn", f"{x}: ComfyUI applies a function to this weight's patch"
                patches[f"{target}@{offset}"] = ComfyPatch(lora[up_name], lora[down_name], alpha, dora, offset)
                loaded.update((up_name, down_name))
                break
    return patches, [k for k in lora if k not in loaded]


def comfy_convert_lora_changes(lora: Mapping[str, Tensor]) -> bool:
    """Whether comfy/lora_convert.py convert_lora rewrites this file (BFL control, Wan Fun, USO, fused qkv)."""
    return ("img_in.lora_A.weight" in lora and "single_blocks.0.norm.key_norm.scale" in lora
            or "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in lora
            or "single_blocks.37.processor.qkv_lora.up.weight" in lora
            or any(re.search(r"(.*attn[._]to_)qkv(?=\.|$)", k) and ("text_fusion" in k or "transformer_blocks" in k)
                   for k in lora))


def comfy_patched_weight(weight: Tensor, patch: ComfyPatch, strength: float = 1.0) -> Tensor:
    """calculate_weight (narrow to the offset) + LoRAAdapter.calculate_weight + weight_decompose, fp32."""
    weight = weight.detach().float().clone()
    full = weight
    if patch.offset is not None:
        weight = weight.narrow(*patch.offset)
    mat1, mat2 = patch.up.float(), patch.down.float()
    alpha = patch.alpha / mat2.shape[0] if patch.alpha is not None else 1.0
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    if patch.dora_scale is None:
        weight += (strength * alpha) * lora_diff
        return full
    dora_scale = patch.dora_scale.float()
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: the norm of the unpatched weight
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    if strength != 1.0:
        weight += strength * (weight_calc - weight)
    else:
        weight[:] = weight_calc
    return full


# ------------------------------------------------------------------ A1111 extensions-builtin/Lora
_RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_SUFFIX_CONVERSION = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                                     "norm1": "in_layers_0", "norm2": "out_layers_0",
                                                     "time_emb_proj": "emb_layers_1",
                                                     "conv_shortcut": "skip_connection"}}


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """networks.py convert_diffusers_name_to_compvis."""
    def match(regex: str) -> list | None:
        r = re.match(regex, key)
        return None if not r else [int(x) if re.match(r"\d+", x) else x for x in r.groups()]

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_layer_names(family: str, unet_config: Mapping[str, Any] | None,
                      text_layers: Mapping[str, int]) -> dict[str, str]:
    """assign_network_names_to_compvis_modules: A1111's module names (dots as underscores) -> the diffusers
    module each one is (component-prefixed; an OpenCLIP attention `..._attn` is its q/k/v in-projection).

    UNet: sd_model.model.named_modules() = diffusion_model.<LDM module>. Text (`text_layers`: component ->
    number of CLIP layers): SD 1.x cond_stage_model.wrapped = FrozenCLIPEmbedder (transformer.text_model...);
    SDXL conditioner.embedders[0] the same, embedders[1] OpenCLIP (model.transformer.resblocks.N.attn, .mlp.c_fc...)."""
    names: dict[str, str] = {}
    if unet_config is not None:
        for diffusers, ldm in unet_weights_to_diffusers(comfy_unet_config(unet_config)).items():
            names["diffusion_model_" + ldm[: -len(".weight")].replace(".", "_")] = "unet." + diffusers[:-7]
    clip = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
            "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
            "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
    for component, layers in text_layers.items():
        for i in range(layers):
            for a1111, hf in clip.items():
                module = f"{component}.text_model.encoder.layers.{i}.{hf}"
                if family in ("sd1x", "legacy"):
                    names[f"transformer_text_model_encoder_layers_{i}_{a1111}"] = module
                elif family == "sdxl" and component == "text_encoder":
                    names[f"0_transformer_text_model_encoder_layers_{i}_{a1111}"] = module
                elif (family, component) in (("sdxl", "text_encoder_2"), ("sd2x", "text_encoder")):
                    openclip = {"self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc",
                                "mlp_fc2": "mlp_c_proj"}.get(a1111, "attn")
                    prefix = "1_" if family == "sdxl" else ""
                    names.setdefault(f"{prefix}model_transformer_resblocks_{i}_{openclip}", module)
    return names


def a1111_module_of(sd_key: str, layers: Mapping[str, str]) -> str:
    """The diffusers module an A1111 network key lands on; `..._attn_q_proj` is the q part of the OpenCLIP
    attention's in-projection (network_apply_weights puts the q, k, v updowns together)."""
    if sd_key in layers:
        return layers[sd_key]
    m = _RE_X_PROJ.match(sd_key)
    return layers[m.group(1)].rsplit(".", 1)[0] + "." + m.group(2)


def a1111_load_network(lora: Mapping[str, Tensor], layers: Mapping[str, str], is_sd2: bool = False
                       ) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """load_network's key matching: {sd_key: {network_part: tensor}} and the keys that failed to match."""
    matched: dict[str, dict[str, Tensor]] = {}
    failed: dict[str, str] = {}
    for key_network, weight in lora.items():
        base, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        found = key in layers
        if not found and (m := _RE_X_PROJ.match(key)):
            found = m.group(1) in layers
        if not found and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            found = key in layers
        elif not found and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            found = key in layers
            if not found:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                found = key in layers
        if not found:
            failed[key_network] = key
            continue
        matched.setdefault(key, {})[network_part] = weight
    return matched, failed


def a1111_delta(weights: Mapping[str, Tensor], multiplier: float = 1.0) -> Tensor:
    """network_lora.NetworkModuleLora.calc_updown + NetworkModule.finalize_updown for a Linear layer."""
    up, down = weights["lora_up.weight"].float(), weights["lora_down.weight"].float()
    alpha = weights["alpha"].item() if "alpha" in weights else None
    dim = down.shape[0]
    scale = alpha / dim if alpha is not None else 1.0
    return (up.flatten(1) @ down.flatten(1)) * scale * multiplier
