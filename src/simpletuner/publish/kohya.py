"""Key-name rules of the LoRA file for the UIs: ComfyUI, A1111 and Forge ("kohya" names).

`to_ui_state_dict` turns a diffusers/peft LoRA state dict (the one `save_lora_weights` writes:
`unet.<module>.lora_A.weight`, `transformer.<module>.lora.down.weight`, `text_encoder.<module>...`)
into the names those loaders match, one module at a time:

- UNet families (SD 1.x/2.x, SDXL base and refiner, Kolors): `lora_unet_<module>` with the
  module's ORIGINAL (LDM/SGM checkpoint) name, dots as underscores, e.g.
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k`. ComfyUI matches these against its
  own model's names (comfy/lora.py `model_lora_keys_unet`); A1111 finds them by replacing
  `lora_unet` with `diffusion_model` (extensions-builtin/Lora/networks.py `load_network`).
- SD3, Flux, PixArt: `transformer.<diffusers module>`, which ComfyUI maps to its fused weights
  with offsets (comfy/utils.py `mmdit_to_diffusers`, `flux_to_diffusers`, `pixart_to_diffusers`).
- Hunyuan-DiT: `base_model.model.<original module>` (comfy/lora.py `model_lora_keys_unet`, its
  HunyuanDiT branch: the model's own names, comfy/ldm/hydit). Its self-attention q, k, v are one
  weight there (`attn1.Wqkv`, rows q, k, v) and the cross-attention's k, v another (`attn2.kv_proj`,
  rows k, v), which a LoRA key addresses whole. The separate LoRAs are written as one LoRA on the
  fused weight, exactly: down = the parts' downs stacked (rank r_q + r_k + r_v), up = their ups on
  the block diagonal, each part's up scaled by its alpha/rank over the first part's, and alpha = the
  first part's alpha/rank times the fused rank. All parts must be trained together (every preset does).
- Text encoders: `lora_te_` (SD 1.x/2.x, SDXL refiner), `lora_te1_` / `lora_te2_` / `lora_te3_`
  (one per encoder, in ComfyUI's order) + the transformers module name, dots as underscores.

Every module gets `<key>.lora_down.weight`, `<key>.lora_up.weight` and `<key>.alpha` (a float32
scalar: the loaders scale by alpha / rank and read alpha from this tensor only). A DoRA module
also gets `<key>.dora_scale`, shaped [out, 1]: ComfyUI then rescales each output row of
W + (alpha/rank) up @ down by dora_scale / ||W row|| (comfy/weight_adapter/base.py
`weight_decompose`, norm of the base weight), so we store peft's magnitude m times
||W row|| / ||(W + delta) row||, which makes ComfyUI's result peft's: m * (W + delta) / ||W + delta||.
That needs the base weights (`base_weights`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from simpletuner.errors import UserError

# suffixes of one module's tensors in a diffusers/peft state dict -> our role
_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", ".lora_linear_layer.down.weight")
_UP = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight", ".lora_linear_layer.up.weight")
_MAGNITUDE = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")
_ALPHA = (".alpha",)

_CLIP_MODULE = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
_T5_MODULE = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))")

_JOINT_BLOCK = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear)")
_FLUX_MODULE = re.compile(
    _JOINT_BLOCK[:-1] + r"|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
    r"|proj_out|x_embedder|context_embedder|time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]")
_SD3_MODULE = re.compile(
    _JOINT_BLOCK + r"|proj_out|context_embedder|time_text_embed\.(timestep|text)_embedder\.linear_[12]")
_PIXART_MODULE = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")
# Hunyuan-DiT: diffusers module in blocks.N -> (ComfyUI's module in blocks.N, part, parts of it)
_HUNYUAN_BLOCK = {"attn1.to_q": ("attn1.Wqkv", 0, 3), "attn1.to_k": ("attn1.Wqkv", 1, 3),
                  "attn1.to_v": ("attn1.Wqkv", 2, 3), "attn1.to_out.0": ("attn1.out_proj", 0, 1),
                  "attn2.to_q": ("attn2.q_proj", 0, 1), "attn2.to_k": ("attn2.kv_proj", 0, 2),
                  "attn2.to_v": ("attn2.kv_proj", 1, 2), "attn2.to_out.0": ("attn2.out_proj", 0, 1),
                  "ff.net.0.proj": ("mlp.fc1", 0, 1), "ff.net.2": ("mlp.fc2", 0, 1),
                  "norm1.linear": ("default_modulation.1", 0, 1), "skip_linear": ("skip_linear", 0, 1)}
_HUNYUAN_MODULE = re.compile(r"blocks\.(\d+)\.(" + "|".join(map(re.escape, _HUNYUAN_BLOCK)) + ")")

# diffusers UNet resnet sub-modules -> LDM names (inside input/middle/output blocks)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}


@dataclass(frozen=True)
class UIFormat:
    """How one family's modules are named in the UI file.

    `denoiser`: the component prefix of the denoiser in diffusers files (unet / transformer);
    `transformer_modules`: for transformer families, the diffusers modules ComfyUI maps (None: a UNet,
    named by its LDM names); `text_encoders`: component -> kohya prefix; `text_modules`: component ->
    the modules of it that ComfyUI maps; `original`: for a transformer ComfyUI knows by its original
    names only, diffusers module -> (original module, part, parts) (parts > 1: a fused weight).
    """

    denoiser: str
    transformer_modules: re.Pattern[str] | None = None
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    text_modules: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    original: Callable[[str], tuple[str, int, int]] | None = None


def hunyuan_dit_original(path: str) -> tuple[str, int, int]:
    """A Hunyuan-DiT diffusers module -> (its name in ComfyUI's model, its part of that weight, the parts)."""
    match = _HUNYUAN_MODULE.fullmatch(path)
    if match is None:
        raise KeyError(path)
    name, part, parts = _HUNYUAN_BLOCK[match[2]]
    return f"blocks.{match[1]}.{name}", part, parts


_SD_TEXT = UIFormat("unet", None, {"text_encoder": "lora_te"}, {"text_encoder": _CLIP_MODULE})
FORMATS: dict[str, UIFormat] = {
    "legacy": _SD_TEXT,
    "sd1x": _SD_TEXT,
    "sd2x": _SD_TEXT,
    "sdxl": UIFormat("unet", None, {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
                     {"text_encoder": _CLIP_MODULE, "text_encoder_2": _CLIP_MODULE}),
    "sdxl_refiner": UIFormat("unet", None, {"text_encoder_2": "lora_te"}, {"text_encoder_2": _CLIP_MODULE}),
    "kolors": UIFormat("unet"),
    "sd3": UIFormat("transformer", _SD3_MODULE,
                    {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"},
                    {"text_encoder": _CLIP_MODULE, "text_encoder_2": _CLIP_MODULE, "text_encoder_3": _T5_MODULE}),
    "flux": UIFormat("transformer", _FLUX_MODULE, {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
                     {"text_encoder": _CLIP_MODULE, "text_encoder_2": _T5_MODULE}),
    "pixart_sigma": UIFormat("transformer", _PIXART_MODULE, {"text_encoder": "lora_te1"},
                             {"text_encoder": _T5_MODULE}),
    "hunyuan_dit": UIFormat("transformer", _HUNYUAN_MODULE, original=hunyuan_dit_original),
}


@dataclass
class _Module:
    down: Tensor | None = None
    up: Tensor | None = None
    magnitude: Tensor | None = None
    alpha: Tensor | None = None


@dataclass
class _Entry:
    """One module of the UI file: its key, LoRA, alpha, and for DoRA its magnitude and base weight."""

    key: str
    down: Tensor
    up: Tensor
    alpha: float
    magnitude: Tensor | None = None
    base: Tensor | None = None


def to_ui_state_dict(
    family_name: str,
    diffusers_state_dict: Mapping[str, Tensor],
    alphas: Mapping[str, float] | float,
    *,
    denoiser_config: Mapping[str, Any] | None = None,
    base_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The UI file's tensors for a diffusers/peft LoRA state dict.

    `alphas`: one alpha for every module, or a mapping from a component ("unet", "text_encoder")
    or a full module name as the state dict has it ("unet.down_blocks.0...to_k") to alpha (the
    module's entry wins); an `.alpha` tensor in the state dict wins over both.
    `denoiser_config`: the UNet's config (layers_per_block, up_block_types), needed for UNet families.
    `base_weights`: full module name -> the frozen base weight, needed for DoRA modules.
    Keys without a component prefix belong to the denoiser. Raises UserError for a family without
    a UI format or a module the UIs cannot load.
    """
    if family_name not in FORMATS:
        raise UserError(f"model family {family_name!r} has no ComfyUI/A1111 LoRA format (lora_format=comfyui "
                        f"is available for {', '.join(sorted(FORMATS))})")
    rules = FORMATS[family_name]
    layout: _UNetLayout | None = None
    entries: dict[str, list[_Entry | None]] = {}
    for name, module in _group_modules(diffusers_state_dict, rules.denoiser).items():
        component, _, path = name.partition(".")
        if component == "unet" and layout is None and rules.transformer_modules is None:
            layout = _UNetLayout.from_config(denoiser_config)
        key = _ui_key(rules, layout, component, path, family_name)
        part, parts = 0, 1
        if component == rules.denoiser and rules.original is not None:
            original, part, parts = rules.original(path)
            key = f"base_model.model.{original}"
        alpha = float(module.alpha) if module.alpha is not None else _alpha_for(alphas, name, component)
        base = (base_weights or {}).get(name)
        if module.magnitude is not None and base is None:
            raise UserError(f"DoRA module {name}: its base weight is needed to write dora_scale")
        entries.setdefault(key, [None] * parts)[part] = _Entry(key, module.down, module.up, alpha,
                                                               module.magnitude, base)
    out: dict[str, Tensor] = {}
    for key, parts in entries.items():
        entry = _fused(key, parts)
        out[f"{key}.lora_down.weight"] = entry.down.contiguous()
        out[f"{key}.lora_up.weight"] = entry.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(entry.alpha, dtype=torch.float32)
        if entry.magnitude is not None:
            scale = entry.alpha / entry.down.shape[0]
            out[f"{key}.dora_scale"] = comfy_dora_scale(entry.magnitude, entry.base, entry.up, entry.down, scale)
    return out


def _fused(key: str, parts: list[_Entry | None]) -> _Entry:
    """The one LoRA on a fused weight equal to its parts' LoRAs (each part: a block of rows), exactly:
    downs stacked, ups on the block diagonal, each up scaled by its part's alpha/rank relative to the first."""
    if len(parts) == 1:
        return parts[0]
    if any(part is None for part in parts):
        raise UserError(f"LoRA module {key}: ComfyUI holds it as one weight of {len(parts)} parts, and only "
                        f"{sum(part is not None for part in parts)} of them were trained; train all of them")
    if len({part.magnitude is None for part in parts}) > 1:
        raise UserError(f"LoRA module {key}: its parts mix DoRA and plain LoRA")
    scales = [part.alpha / part.down.shape[0] for part in parts]
    down = torch.cat([part.down for part in parts])
    up = torch.block_diag(*[part.up * (scale / scales[0]) if scale != scales[0] else part.up
                            for part, scale in zip(parts, scales)])
    dora = parts[0].magnitude is not None
    return _Entry(key, down, up, scales[0] * down.shape[0],
                  torch.cat([part.magnitude.reshape(-1) for part in parts]) if dora else None,
                  torch.cat([part.base for part in parts]) if dora else None)


def comfy_dora_scale(magnitude: Tensor, base: Tensor, up: Tensor, down: Tensor, scale: float) -> Tensor:
    """[out, 1] dora_scale with which ComfyUI's weight_decompose yields peft's DoRA weight (see module doc)."""
    base32 = base.detach().to("cpu", torch.float32).flatten(1)
    delta = scale * (up.detach().float().flatten(1) @ down.detach().float().flatten(1))
    merged_norm = (base32 + delta).norm(dim=1, keepdim=True)
    return (magnitude.detach().float().reshape(-1, 1) * base32.norm(dim=1, keepdim=True) / merged_norm).contiguous()


def _group_modules(state_dict: Mapping[str, Tensor], denoiser: str) -> dict[str, _Module]:
    """Full module name (with its component prefix) -> its LoRA tensors; checks each module is complete."""
    modules: dict[str, _Module] = {}
    for key, tensor in state_dict.items():
        for suffixes, role in ((_DOWN, "down"), (_UP, "up"), (_MAGNITUDE, "magnitude"), (_ALPHA, "alpha")):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                break
        else:
            raise UserError(f"LoRA state dict key {key!r} is not a LoRA weight (lora_A/lora_B, lora.down/lora.up, "
                            "lora_magnitude_vector or alpha)")
        name = key[: -len(suffix)]
        if not name.startswith(("unet.", "transformer.", "text_encoder")):
            name = f"{denoiser}.{name}"
        setattr(modules.setdefault(name, _Module()), role, tensor)
    for name, module in modules.items():
        if module.down is None or module.up is None:
            raise UserError(f"LoRA module {name} lacks its {'down (lora_A)' if module.down is None else 'up (lora_B)'} "
                            "weight")
    return modules


def _alpha_for(alphas: Mapping[str, float] | float, name: str, component: str) -> float:
    if isinstance(alphas, (int, float)):
        return float(alphas)
    for key in (name, component):
        if key in alphas:
            return float(alphas[key])
    raise UserError(f"no LoRA alpha given for {name}")


def _ui_key(rules: UIFormat, layout: _UNetLayout | None, component: str, path: str, family: str) -> str:
    if component in ("unet", "transformer"):
        if component != rules.denoiser:
            raise UserError(f"LoRA module {component}.{path}: {family} has no {component}")
        if layout is not None:
            return "lora_unet_" + layout.ldm_name(path).replace(".", "_")
        if not rules.transformer_modules.fullmatch(path):
            raise UserError(f"LoRA module transformer.{path} has no ComfyUI name for {family} "
                            "(ComfyUI maps the attention, feed-forward and modulation layers)")
        return f"transformer.{path}"
    prefix, pattern = rules.text_encoders.get(component), rules.text_modules.get(component)
    if prefix is None or pattern is None:
        raise UserError(f"LoRA module {component}.{path}: no ComfyUI/A1111 name for {family}'s {component}")
    if not pattern.fullmatch(path):
        raise UserError(f"LoRA module {component}.{path}: the UIs load text-encoder LoRA on the attention and MLP "
                        "projections only")
    if pattern is _CLIP_MODULE and not path.startswith("text_model."):
        path = f"text_model.{path}"  # transformers 5 drops CLIPTextModel's text_model wrapper; checkpoints keep it
    return f"{prefix}_{path.replace('.', '_')}"


@dataclass(frozen=True)
class _UNetLayout:
    """What fixes a diffusers UNet module's LDM name: resnets per down block, and which up blocks attend."""

    layers: tuple[int, ...]
    up_attends: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> _UNetLayout:
        if not config or "down_block_types" not in config:
            raise UserError("a UNet LoRA needs the UNet's config (layers_per_block, down/up_block_types) for "
                            "its ComfyUI/A1111 names")
        blocks = len(config["down_block_types"])
        per_block = config.get("layers_per_block", 2)
        layers = tuple(per_block) if isinstance(per_block, (list, tuple)) else (per_block,) * blocks
        return cls(layers, tuple("CrossAttn" in kind for kind in config["up_block_types"]))

    def ldm_name(self, path: str) -> str:
        if path in _UNET_BASIC:
            return _UNET_BASIC[path]
        parts = path.split(".")
        try:
            if parts[0] == "down_blocks":
                return self._down(int(parts[1]), parts[2], int(parts[3]), parts[4:])
            if parts[0] == "mid_block":
                index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
                return f"middle_block.{index}." + _inner(parts[1], parts[3:])
            if parts[0] == "up_blocks":
                return self._up(int(parts[1]), parts[2], int(parts[3]), parts[4:])
        except (IndexError, ValueError, KeyError):
            pass
        raise UserError(f"LoRA module unet.{path} has no LDM (ComfyUI/A1111) name")

    def _down(self, block: int, kind: str, index: int, rest: list[str]) -> str:
        first = 1 + sum(n + 1 for n in self.layers[:block])
        if kind == "downsamplers":
            return f"input_blocks.{first + self.layers[block]}.0.op"
        return f"input_blocks.{first + index}.{1 if kind == 'attentions' else 0}." + _inner(kind, rest)

    def _up(self, block: int, kind: str, index: int, rest: list[str]) -> str:
        layers = tuple(reversed(self.layers))
        first = sum(n + 1 for n in layers[:block])
        if kind == "upsamplers":
            return f"output_blocks.{first + layers[block]}.{2 if self.up_attends[block] else 1}.conv"
        return f"output_blocks.{first + index}.{1 if kind == 'attentions' else 0}." + _inner(kind, rest)


def _inner(kind: str, rest: list[str]) -> str:
    """The sub-module path inside an LDM block: a transformer keeps its names, a resnet is renamed."""
    if kind == "attentions":
        if not rest:
            raise KeyError(kind)
        return ".".join(rest)
    if kind == "resnets" and len(rest) == 1:
        return _RESNET[rest[0]]
    raise KeyError(kind)
