"""fuse_qkv_projections: one matmul for each attention layer's query, key and value projections.

diffusers' `fuse_qkv_projections()` adds fused linear layers holding the concatenated
weights (`to_qkv`; `to_kv` for cross-attention, whose query stays apart; `to_added_qkv`
for the text stream of joint attention) and switches the attention to them. Here the
original projections then become views of their rows of the fused weight: they hold
no memory of their own, stay equal to it while it trains (optimisers, EMA and
checkpoint loading all write in place), and do not train themselves. `unfuse_qkv`
gives them their own copy again and removes the fused layers, so the model saves with
diffusers' usual keys.

Full training only: a LoRA placed on the fused layer would share one down matrix
between q, k and v, another adapter than the separate ones trained without fusion,
and adapters on to_q/to_k/to_v would sit on layers the fused forward never calls
(the configuration refuses the combination).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from simpletuner.errors import UserError

# fused layer -> the projections it concatenates, in order
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the model's attention projections (diffusers' own fusion); returns how many fused layers it has.

    Raises UserError when the model cannot fuse (no fusion in diffusers, or added-KV attention).
    """
    fuse = getattr(model, "fuse_qkv_projections", None)
    name = type(model).__name__
    if fuse is None:
        raise UserError(f"fuse_qkv_projections=true: diffusers' {name} cannot fuse its attention projections; "
                        "set fuse_qkv_projections=false")
    try:
        fuse()
    except ValueError as error:  # diffusers refuses models with added key/value projections (DeepFloyd IF)
        raise UserError(f"fuse_qkv_projections=true: {name}: {error} Set fuse_qkv_projections=false") from error
    layers = list(_fused_layers(model))
    if not layers:
        raise UserError(f"fuse_qkv_projections=true: {name} has no attention projections diffusers fused; "
                        "set fuse_qkv_projections=false")
    for fused, parts in layers:
        _share_rows(fused, parts)
    return len(layers)


def unfuse_qkv(model: nn.Module) -> None:
    """Undo `fuse_qkv`: each projection owns its (trained) weights again; the fused layers are removed."""
    for module in list(model.modules()):
        for fused_name, part_names in FUSED_PARTS.items():
            fused = getattr(module, fused_name, None)
            if not isinstance(fused, nn.Linear):
                continue
            for part in (getattr(module, name) for name in part_names):
                for own, shared in ((part.weight, fused.weight), (part.bias, fused.bias)):
                    if own is not None:
                        own.data = own.data.clone()
                        own.requires_grad_(shared.requires_grad)
            delattr(module, fused_name)
        if getattr(module, "fused_projections", False):
            module.fused_projections = False
    original = getattr(model, "original_attn_processors", None)
    if original:  # UNet, SD3 and PixArt swap their processors when fusing; Flux's read fused_projections
        model.set_attn_processor(dict(original))
        model.original_attn_processors = None


def _fused_layers(model: nn.Module):
    for module in model.modules():
        for fused_name, part_names in FUSED_PARTS.items():
            fused = getattr(module, fused_name, None)
            if isinstance(fused, nn.Linear):
                yield fused, [getattr(module, name) for name in part_names]


def _share_rows(fused: nn.Linear, parts: Sequence[nn.Linear]) -> None:
    """Make each part's weight (and bias) the view of its rows of the fused layer's, frozen."""
    start = 0
    for part in parts:
        rows = slice(start, start + part.out_features)
        if tuple(part.weight.shape) != tuple(fused.weight[rows].shape) or (part.bias is None) != (fused.bias is None):
            raise UserError(f"fuse_qkv_projections=true: a fused projection of shape {tuple(fused.weight.shape)} "
                            f"does not hold its part of shape {tuple(part.weight.shape)} (bias: "
                            f"{part.bias is not None}); set fuse_qkv_projections=false")
        part.weight.data = fused.weight.data[rows]
        part.weight.requires_grad_(False)
        if part.bias is not None:
            part.bias.data = fused.bias.data[rows]
            part.bias.requires_grad_(False)
        start += part.out_features
