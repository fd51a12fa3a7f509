"""fuse_qkv_projections: one matmul for each attention layer's query, key and value projections.

diffusers' `fuse_qkv_projections()` adds fused linear layers holding the concatenated
weights (`to_qkv`; `to_kv` for cross-attention, whose query stays apart; `to_added_qkv`
for the text stream of joint attention) and switches the attention to them. Here the
original projections then become views of their rows of the fused weight: they hold
no memory of their own, stay equal to it while it trains (optimisers, EMA and
checkpoint loading all write in place), and do not train themselves. `unfuse_qkv`
gives them their own copy again and removes the fused layers, so the model saves with
diffusers' usual keys.

With a LoRA (peft, `model_type` lora), the model is fused before the adapter is added: the adapter sits
on each fused layer (`fused_adapter_targets`: the preset's projections are left out, the fused layers
they make up are named instead), so one down matrix A serves q, k and v and the up matrix B stacks
their rows. Its delta B @ A is, row block by row block, the deltas B_q @ A, B_k @ A, B_v @ A:
`split_fused_lora` writes it as three LoRAs with diffusers' usual names, which apply exactly the
delta trained (DoRA's magnitude, a per-row scale, splits the same way). LyCORIS the same way, for the
algorithms whose factors split by rows (`LYCORIS_SPLIT_ALGOS`: LoCon's up matrix; LoHa's two `_a`
factors, as the Hadamard product of row blocks is the row block of the product): `split_fused_lycoris`
rewrites the exported file. LoKr is refused: a Kronecker product's row blocks are no Kronecker products
in general.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from simpletuner.errors import UserError

if TYPE_CHECKING:
    from simpletuner.train.adapters import TrainedLora

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


# ------------------------------------------------------------------------------- LoRA on fused layers
def fused_adapter_targets(model: nn.Module, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """peft's target and excluded modules for a LoRA on the fused `model`.

    Each fused layer all of whose projections the preset names is targeted (by its path); the
    projections it holds, which the fused attention never calls, are excluded. Raises UserError when a
    preset names only some projections of a fused layer (the fused adapter would change the others).
    """
    added, excluded = [], []
    for path, fused_name, parts in _fused_names(model):
        named = [part for part in parts if _targeted(f"{path}.{part}", targets)]
        excluded += [f"{path}.{part}" for part in parts]
        if named and len(named) < len(parts):
            raise UserError(f"fuse_qkv_projections=true: the LoRA targets {sorted(targets)} name {', '.join(named)} "
                            f"but not all of {', '.join(parts)}, which {path}.{fused_name} computes in one matmul; "
                            "choose a preset with all of them, or set fuse_qkv_projections=false")
        if named:
            added.append(f"{path}.{fused_name}")
    return [*targets, *added], excluded


def fused_part_rows(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Path of each fused layer -> the path and row count of each projection it holds, in order."""
    return {f"{path}.{fused_name}": [(f"{path}.{part}", model.get_submodule(f"{path}.{part}").out_features)
                                     for part in parts]
            for path, fused_name, parts in _fused_names(model)}


def split_fused_lora(lora: TrainedLora, component: str, rows: Mapping[str, Sequence[tuple[str, int]]]) -> TrainedLora:
    """The LoRA of `component` with each fused layer's adapter split into its projections' adapters.

    A is shared; B, DoRA's magnitude and the frozen base weight (for formats that need it) split by rows.
    The configuration names the preset's modules again, as a LoRA trained unfused.
    """
    layers: dict[str, Any] = {}
    for key, value in lora.layers[component].items():
        module, _, kind = key.partition(".lora_")
        if module not in rows:
            layers[key] = value
            continue
        start = 0
        for part, count in rows[module]:
            if kind.startswith("A."):
                layers[f"{part}.lora_{kind}"] = value.clone()
            else:  # B's rows, the magnitude's entries
                layers[f"{part}.lora_{kind}"] = value[start:start + count].clone()
            start += count
    config = dict(lora.configs[component])
    targets = config.get("target_modules") or ()
    if not isinstance(targets, str):  # a list (a regular expression names no fused layer)
        config["target_modules"] = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in FUSED_PARTS)
    config["exclude_modules"] = None
    bases = dict(lora.base_weights)
    if component in bases:
        bases[component] = _split_rows(bases[component], rows)
    return replace(lora, layers={**lora.layers, component: layers}, configs={**lora.configs, component: config},
                   base_weights=bases)


def fuse_lora_weights(weights: Mapping[str, Any], rows: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, Any]:
    """The inverse of `split_fused_lora` on peft-named weights: each fused layer's projections' adapters joined
    into the fused layer's (B and DoRA's magnitude stacked, A shared). Raises UserError when their down matrices
    differ (a LoRA trained unfused: no adapter on the fused layer applies its delta)."""
    joined = dict(weights)
    for fused, parts in rows.items():
        names = [part for part, _ in parts]
        kinds = sorted({key.partition(".lora_")[2] for key in weights if key.partition(".lora_")[0] in names})
        for kind in kinds:
            values = [joined.pop(f"{part}.lora_{kind}", None) for part in names]
            if any(value is None for value in values):
                raise UserError(f"init_lora: {fused} needs adapters on all of {', '.join(names)}; the file has "
                                "only some")
            if kind.startswith("A."):
                if not all(torch.equal(values[0], value) for value in values[1:]):
                    raise UserError(f"init_lora: the adapters of {', '.join(names)} have different down matrices (a "
                                    "LoRA trained without fuse_qkv_projections), so no adapter on the fused layer "
                                    f"{fused} applies them; start it with fuse_qkv_projections=false")
                joined[f"{fused}.lora_{kind}"] = values[0]
            else:
                joined[f"{fused}.lora_{kind}"] = torch.cat(values)
    return joined


def _split_rows(weights: Mapping[str, Any], rows: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, Any]:
    split: dict[str, Any] = {}
    for module, weight in weights.items():
        if module not in rows:
            split[module] = weight
            continue
        start = 0
        for part, count in rows[module]:
            split[part] = weight[start:start + count]
            start += count
    return split


def _fused_names(model: nn.Module):
    """(module path, fused layer name, its projections) for every fused layer, adapted or not."""
    for path, module in model.named_modules():
        for fused_name, parts in FUSED_PARTS.items():
            if isinstance(getattr(module, fused_name, None), nn.Module) and all(
                    isinstance(getattr(module, part, None), nn.Linear) for part in parts):
                yield path, fused_name, parts


def _targeted(path: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the path is one, or ends with one on a dot boundary."""
    return any(path == target or path.endswith(f".{target}") for target in targets)


# ------------------------------------------------------------------------------- LyCORIS on fused layers
LYCORIS_SPLIT_ALGOS = ("lora", "locon", "loha")
_LYCORIS_ROWS = ("lora_up.weight", "hada_w1_a", "hada_w2_a")  # split by rows; every other tensor is shared
_LYCORIS_SHARED = ("lora_down.weight", "hada_w1_b", "hada_w2_b", "alpha", "scalar")


def check_lycoris_split(config: Mapping[str, Any]) -> None:
    """Refuse, by name, a LyCORIS configuration whose adapters on a fused layer cannot be saved split."""
    algo = config.get("algo")
    if algo not in LYCORIS_SPLIT_ALGOS or config.get("weight_decompose") or config.get("dora_wd"):
        raise UserError(f"fuse_qkv_projections=true with lycoris_config algo {algo!r}"
                        f"{' and weight_decompose' if algo in LYCORIS_SPLIT_ALGOS else ''}: its adapter on a fused "
                        f"layer does not split back into the q, k and v adapters; use algo "
                        f"{', '.join(LYCORIS_SPLIT_ALGOS)} without weight_decompose, or set fuse_qkv_projections=false")


def lycoris_excluded(paths: Sequence[str], config: Mapping[str, Any]) -> list[str]:
    """LyCORIS `exclude_name` patterns matching exactly `paths` (its patterns are regular expressions matched at
    the start of a module path, or shell patterns with use_fnmatch)."""
    import re

    preset = config.get("apply_preset") or {}
    if preset.get("use_fnmatch"):
        return list(paths)
    return [re.escape(path) + "$" for path in paths]


def split_fused_lycoris(weights: Mapping[str, Any], rows: Mapping[str, Sequence[tuple[str, int]]],
                        prefix: str = "lycoris") -> dict[str, Any]:
    """A LyCORIS state dict with each fused layer's adapter split into its projections' adapters."""
    names = {f"{prefix}_{fused.replace('.', '_')}": [(f"{prefix}_{part.replace('.', '_')}", count)
                                                     for part, count in parts] for fused, parts in rows.items()}
    split: dict[str, Any] = {}
    for key, value in weights.items():
        module, _, kind = key.partition(".")
        if module not in names:
            split[key] = value
            continue
        if kind not in _LYCORIS_ROWS + _LYCORIS_SHARED:
            raise UserError(f"fuse_qkv_projections=true: the LyCORIS weight {key} does not split back into the q, "
                            "k and v adapters; set fuse_qkv_projections=false")
        start = 0
        for part, count in names[module]:
            split[f"{part}.{kind}"] = value[start:start + count].clone() if kind in _LYCORIS_ROWS else value.clone()
            start += count
    return split


def split_fused_lycoris_file(path: Any, rows: Mapping[str, Sequence[tuple[str, int]]]) -> None:
    """Rewrite a LyCORIS file (keeping its header) with each fused layer's adapter split (see above)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from simpletuner.atomic import written_atomically

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
    with written_atomically(path, mode=0o644) as temporary:
        save_file(split_fused_lycoris(weights, rows), str(temporary), metadata=header)
