"""Training memory per family and mode: parameters, gradients, optimiser state and activations.

    python benchmarks/memory.py                       # Flux, SD3, PixArt Sigma, Hunyuan-DiT, SD 1.5, SDXL
    python benchmarks/memory.py --model flux --record # append the table to benchmarks/RESULTS.md

Method (CPU, no GPU needed):
- Parameters: each denoiser is built with its published width (benchmarks/architectures.py) but only
  a few repeated blocks (one per block list; two for SD3, whose last block has no context branch;
  four for Hunyuan-DiT, whose blocks past the middle carry skip projections), in bf16 with random
  weights, and quantised with the trainer's own function
  (`simpletuner.train.quantize.quantize_module`: optimum-quanto int8, bitsandbytes nf4). The bytes of
  every stored tensor (quantised data, scales, quantisation state) are counted per block and
  extrapolated by block count to the full model: total = rest + for every block of the full model
  (its layout read from the full model built on the meta device) the bytes of the built block of
  the same layout.
- Activations: the same reduced-depth model runs forward on PyTorch's meta device (shapes only, no
  arithmetic) with a latent that requires a gradient; the bytes of every tensor autograd saves for
  backward, less the weights themselves, are summed, each tensor once however many operations save
  it. LoRA rows: frozen weights, plus each adapted layer's input and rank-16 intermediate (what its
  LoRA keeps); full rows: every weight trains, so every layer keeps its input. Attention is
  counted as flash / memory-efficient attention saves it (query, key, value, output and the fp32
  log-sum-exp of each row; no probability matrix): on the meta device PyTorch's SDPA would take its
  math path, so it is replaced by a stand-in that saves just those. Depth k and 2k
  give the bytes per block, extrapolated by block count. Batch 1, bf16. With gradient checkpointing
  of every block (SimpleTuner's Flux examples turn it on) the step keeps the part outside the
  blocks, each block's inputs (counted the same way, by forward pre-hooks) and one block's
  activations while it is recomputed; the total column uses this figure.
- Gradients and optimiser: LoRA (rank 16 on the family's diffusers targets) trains fp32 weights with
  AdamW: 4 bytes of gradient and 8 of state per trained weight. Full training: fp32 weights, fp32
  gradients, AdamW state (16 bytes per weight). Sharded rows are the per-rank share computed
  analytically: ZeRO-2 splits gradients and optimiser state across the ranks, ZeRO-3 / FSDP full
  shard splits weights too; activations are never split.
- Block swap rows (`musubi_blocks_to_swap`, Flux's LoRA modes, where a goal is set): the fewest last
  blocks (in running order) whose frozen weights, kept in CPU memory, bring the total under the goal.
  Their bytes leave the parameters column, and the largest swapped block's come back: one swapped block's
  weights are on the accelerator while it runs (train/block_swap.py). Swapped blocks are always
  checkpointed, so the checkpointed activations are unchanged.
- UNets (SD 1.5, SDXL), whose depth is no count of equal blocks, are measured whole:
  the full model is made in bf16 on the CPU (and quantised the same way) for the weights, and runs forward
  on the meta device for the activations, counted as above. With checkpointing, the step keeps what is
  saved outside diffusers' checkpointed units (its ResnetBlock2D and BasicTransformerBlock modules: the
  convolutions and attention projections between them, up- and downsamplers), every unit's inputs, and
  the largest unit's own saves (recomputed in backward). bitsandbytes quantises linear layers only, so
  nf4 leaves the UNets' convolutions in bf16, where optimum-quanto's int8 quantises them too.
- Not counted: the CUDA context, allocator fragmentation, text encoders and VAE (cached before
  training), temporary buffers inside kernels.

With CUDA, `--gpu` builds the full model on the device, runs one real LoRA step per LoRA row (block swap rows
with their blocks swapped) and reports `torch.cuda.max_memory_allocated` beside the estimate.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from benchmarks.architectures import ARCHITECTURES, Architecture, build_model, make_batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GIB = 1024**3
# block lists of each transformer: (attribute, config key of its count)
BLOCK_LISTS = {
    "flux": (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
    "sd3": (("transformer_blocks", "num_layers"),),
    "pixart": (("transformer_blocks", "num_layers"),),
    "hunyuan_dit": (("blocks", "num_layers"),),
}
# blocks of other layouts: Hunyuan-DiT's past the middle have skip projections (paired with earlier ones), SD3's
# last block has no context branch
BUILT_BLOCKS = {"hunyuan_dit": 4, "sd3": 2}
# UNets, measured whole: their depth is no count of equal blocks
WHOLE = ("sd15", "sdxl")
LORA_RANK = 16
# SimpleTuner's published Flux LoRA figures at 1024 px, and this goals
ANCHORS = {"lora-bf16": (30, 24), "lora-int8": (18, 14), "lora-nf4": (9, 9)}
MODES = ("lora-bf16", "lora-int8", "lora-nf4", "full", "full-zero2", "full-zero3/fsdp")


@dataclass
class Row:
    model: str
    mode: str
    parameters: float  # bytes
    gradients: float
    optimizer: float
    activations: float  # every activation kept for backward
    checkpointed: float  # with gradient checkpointing of every block

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.checkpointed


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every stored tensor of `module`: parameters, buffers and quantised payloads."""
    seen: dict[int, torch.Tensor] = {}  # keeps each counted tensor alive, so no id is reused
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        inner = [getattr(tensor, name) for name in ("_data", "_scale", "_shift") if hasattr(tensor, name)]
        if inner:  # optimum-quanto QTensor
            for part in inner:
                add(part)
            return
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit: packed data + absmax (+ its own state when nested)
            for part in (state.absmax, getattr(state.state2, "absmax", None) if state.nested else None,
                         getattr(state, "code", None)):
                if isinstance(part, torch.Tensor):
                    add(part)
        key = id(tensor)
        if key not in seen:
            seen[key] = tensor
            total += tensor.numel() * tensor.element_size()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor.data if isinstance(tensor, nn.Parameter) and not hasattr(tensor, "quant_state") else tensor)
    return total


def reduced_config(arch: Architecture, tiny: bool, scale: int = 1, which: str | None = None) -> dict:
    """The published (or tiny) configuration with few blocks: BUILT_BLOCKS (x `scale` for list `which`)."""
    config = dict(arch.model_config(tiny))
    for attribute, key in BLOCK_LISTS[arch.name]:
        built = min(BUILT_BLOCKS.get(arch.name, 1), config[key])
        config[key] = built * (scale if which in (None, attribute) else 1)
    return config


def _build(arch: Architecture, config: dict, device: str) -> nn.Module:
    import diffusers

    with torch.device(device):
        model = getattr(diffusers, arch.model_class)(**config).to(torch.bfloat16)
    return model.requires_grad_(False)


def _signature(block: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in block.named_parameters())


def block_layout(arch: Architecture, full: dict, reduced: nn.Module) -> dict[str, list[int]]:
    """For every block of the full model (built on the meta device, no memory), the index of the block of
    `reduced` (unquantised) with the same parameter layout."""
    model = _build(arch, full, "meta")
    layout = {}
    for attribute, _ in BLOCK_LISTS[arch.name]:
        built = {}
        for index, block in enumerate(getattr(reduced, attribute)):
            built.setdefault(_signature(block), index)
        layout[attribute] = [built[_signature(block)] for block in getattr(model, attribute)]
    return layout


def extrapolated_bytes(model: nn.Module, arch: Architecture, layout: dict[str, list[int]]) -> float:
    """Bytes of the full model from a reduced one: the rest once, and each block of the full model as many
    bytes as the built block of the same layout (`block_layout`)."""
    total = float(tensor_bytes(model))
    for attribute, _ in BLOCK_LISTS[arch.name]:
        blocks = getattr(model, attribute)
        total -= sum(tensor_bytes(b) for b in blocks)
        total += sum(tensor_bytes(blocks[index]) for index in layout[attribute])
    return total


def running_block_bytes(model: nn.Module, arch: Architecture, layout: dict[str, list[int]]) -> list[int]:
    """Bytes of every block of the full model in the order the blocks run, from the built block of its layout."""
    return [tensor_bytes(getattr(model, attribute)[index]) for attribute, _ in BLOCK_LISTS[arch.name]
            for index in layout[attribute]]


def swapped_row(row: Row, blocks: list[int], goal_bytes: float) -> Row | None:
    """`row` with the fewest last blocks swapped to the CPU that bring its total to `goal_bytes` (one swapped
    block on the accelerator while it runs); None when the row already meets the goal or no count does."""
    if row.total <= goal_bytes:
        return None
    for count in range(1, len(blocks) + 1):
        swapped = blocks[len(blocks) - count:]
        parameters = row.parameters - sum(swapped) + max(swapped)
        candidate = Row(row.model, f"{row.mode} swap {count}", parameters, row.gradients, row.optimizer,
                        row.activations, row.checkpointed)
        if candidate.total <= goal_bytes:
            return candidate
    return None


def adapted_layers(model: nn.Module, arch: Architecture) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers a LoRA on the family's targets adapts, with their names."""
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and any(name.endswith(t) for t in arch.lora_targets):
            yield name, layer


def lora_layer_weights(layer: nn.Linear) -> int:
    """Weights of a rank-LORA_RANK LoRA on `layer`."""
    return LORA_RANK * (layer.in_features + layer.out_features)


def lora_weights(model: nn.Module, arch: Architecture, full: dict, built: dict) -> float:
    """Trained LoRA weights of the full model (rank LORA_RANK on the family's targets)."""
    per_list = {attribute: 0 for attribute, _ in BLOCK_LISTS[arch.name]}
    rest = 0
    for name, layer in adapted_layers(model, arch):
        attribute = name.split(".")[0]
        if attribute in per_list:
            per_list[attribute] += lora_layer_weights(layer)
        else:
            rest += lora_layer_weights(layer)
    return rest + sum(per_list[a] * full[k] / built[k] for a, k in BLOCK_LISTS[arch.name])


class _FlashLike(torch.autograd.Function):
    """Scaled dot-product attention as flash / memory-efficient attention keeps it for backward: query, key,
    value, the output and the rows' log-sum-exp (fp32), no attention matrix. Shapes only (the meta device):
    on meta, PyTorch's SDPA takes its math path, which saves the probabilities and fp32 copies."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise NotImplementedError("shapes only: the memory estimate never runs backward")


def _flash_like(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
                ) -> torch.Tensor:
    return _FlashLike.apply(query, key, value)


def _on_meta(arch: Architecture, config: dict, resolution: int, tiny: bool, trains: str
             ) -> tuple[nn.Module, dict[str, torch.Tensor], set[int]]:
    """The model (its weights trainable when `trains` is "full") and a batch on the meta device, and the ids of
    the weights (not counted as activations)."""
    model = _build(arch, config, "meta")
    if trains == "full":
        model.requires_grad_(True)
    batch = {k: v.to("meta", torch.bfloat16 if v.is_floating_point() else v.dtype)
             for k, v in make_batch(arch, batch=1, resolution=resolution, tiny=tiny).items()}
    return model, batch, {id(p) for p in model.parameters()}


def activation_bytes(arch: Architecture, config: dict, resolution: int, tiny: bool,
                     trains: str = "lora") -> tuple[float, float]:
    """One forward of `config` on the meta device (batch 1, bf16): the bytes autograd saves for backward, and
    the bytes of the blocks' distinct inputs (what checkpointing every block keeps instead). `trains`: "lora"
    (frozen weights; each adapted layer also keeps its input and its rank-r intermediate) or "full" (every
    weight trains, so every layer keeps its input). A tensor saved by several operations counts once."""
    model, batch, weights = _on_meta(arch, config, resolution, tiny, trains)
    saved: dict[int, torch.Tensor] = {}  # by id; holding the tensors keeps their ids from being reused
    intermediates = 0
    inputs: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights and id(tensor) not in weights:
            saved.setdefault(id(tensor), tensor)
        return tensor

    def adapted(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        nonlocal intermediates
        saved.setdefault(id(args[0]), args[0])  # lora_A's weight gradient needs the layer's input
        intermediates += args[0].numel() // module.in_features * LORA_RANK * args[0].element_size()

    if trains == "lora":
        for _, layer in adapted_layers(model, arch):
            layer.register_forward_hook(adapted)

    def keep_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    inputs.setdefault(id(tensor), tensor)

    for attribute, _ in BLOCK_LISTS[arch.name]:
        for block in getattr(model, attribute):
            block.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    noisy = batch["latents"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_like):
        arch.call(model, noisy, torch.ones(1, device="meta"), batch)
    kept = sum(t.numel() * t.element_size() for t in saved.values()) + intermediates
    return float(kept), float(sum(t.numel() * t.element_size() for t in inputs.values()))


def extrapolated_activations(arch: Architecture, tiny: bool, resolution: int, full: dict,
                             built: dict, trains: str = "lora") -> tuple[float, float]:
    """Activations of the full model without and with checkpointing of every block. Checkpointed: the part
    outside the blocks, every block's inputs, and one block's activations (recomputed during backward)."""
    saved, inputs = activation_bytes(arch, built, resolution, tiny, trains)
    plain, kept, per_block = saved, inputs, []
    for attribute, key in BLOCK_LISTS[arch.name]:
        saved_2, inputs_2 = activation_bytes(arch, reduced_config(arch, tiny, 2, attribute), resolution, tiny,
                                             trains)
        block = (saved_2 - saved) / built[key]
        per_block.append(block)
        plain += block * (full[key] - built[key])
        kept += (inputs_2 - inputs) / built[key] * (full[key] - built[key])
    outside = saved - sum(block * built[key] for block, (_, key) in zip(per_block, BLOCK_LISTS[arch.name]))
    return plain, outside + kept + max(per_block)


def measure(name: str, *, tiny: bool, resolution: int, world_sizes: tuple[int, ...]) -> list[Row]:
    """Every mode of one family."""
    from simpletuner.train.quantize import quantize_module

    arch = ARCHITECTURES[name]
    full, built = dict(arch.model_config(tiny)), reduced_config(arch, tiny)
    activations = extrapolated_activations(arch, tiny, resolution, full, built)  # (plain, checkpointed)
    trained_all = extrapolated_activations(arch, tiny, resolution, full, built, "full")
    model = _build(arch, built, "cpu")
    layout = block_layout(arch, full, model)
    bf16 = extrapolated_bytes(model, arch, layout)
    lora = lora_weights(model, arch, full, built)
    parameters = bf16 / 2  # bf16: 2 bytes per weight
    rows = [Row(name, "lora-bf16", bf16 + 4 * lora, 4 * lora, 8 * lora, *activations)]
    blocks = {"lora-bf16": running_block_bytes(model, arch, layout)}
    for precision, mode in (("int8-quanto", "lora-int8"), ("nf4-bnb", "lora-nf4")):
        quantised = _build(arch, built, "cpu")
        quantised.load_state_dict(model.state_dict())
        quantize_module(quantised, precision)
        rows.append(Row(name, mode, extrapolated_bytes(quantised, arch, layout) + 4 * lora, 4 * lora,
                        8 * lora, *activations))
        blocks[mode] = running_block_bytes(quantised, arch, layout)
        del quantised
    if name == "flux":  # the goals are Flux's
        rows += [row for row in (swapped_row(row, blocks[row.mode], ANCHORS[row.mode][1] * 1e9)
                                 for row in list(rows)) if row is not None]
    del model
    return rows + full_rows(name, parameters, trained_all, world_sizes)


def full_rows(name: str, parameters: float, activations: tuple[float, float], world_sizes: tuple[int, ...]
              ) -> list[Row]:
    """Full training of `parameters` weights: fp32 weights and gradients, AdamW; alone and sharded per rank."""
    rows = [Row(name, "full", 4 * parameters, 4 * parameters, 8 * parameters, *activations)]
    for world in world_sizes:
        rows.append(Row(name, f"full-zero2 x{world}", 4 * parameters, 4 * parameters / world,
                        8 * parameters / world, *activations))
        rows.append(Row(name, f"full-zero3/fsdp x{world}", 4 * parameters / world, 4 * parameters / world,
                        8 * parameters / world, *activations))
    return rows


def _build_whole(arch: Architecture, config: dict) -> nn.Module:
    """The whole model on the CPU, made in bf16 (at full size a UNet never exists in fp32 here)."""
    import diffusers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = getattr(diffusers, arch.model_class)(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).requires_grad_(False)


def unit_activations(arch: Architecture, config: dict, resolution: int, tiny: bool,
                     trains: str = "lora") -> tuple[float, float]:
    """One forward of the whole model on the meta device (batch 1, bf16): the bytes autograd saves for
    backward, and what the step keeps when diffusers' gradient checkpointing recomputes its units (modules of
    the classes `arch.block_classes`): the tensors saved outside the units, the units' inputs, and the largest
    unit's own saves (recomputed in backward). `trains` as for `activation_bytes`."""
    model, batch, weights = _on_meta(arch, config, resolution, tiny, trains)
    saved: dict[int, tuple[torch.Tensor, int | None]] = {}  # id -> (tensor, the unit running when it was saved)
    inputs: dict[int, torch.Tensor] = {}
    extra: dict[int | None, float] = {}  # LoRA's rank-r intermediates, by unit
    running: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights and id(tensor) not in weights and id(tensor) not in saved:
            saved[id(tensor)] = (tensor, running[0] if running else None)
        return tensor

    def adapted(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        pack(args[0])  # lora_A's weight gradient needs the layer's input
        unit = running[0] if running else None
        extra[unit] = extra.get(unit, 0.0) + (args[0].numel() // module.in_features * LORA_RANK
                                              * args[0].element_size())

    def enter(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            for value in [*args, *kwargs.values()]:
                if isinstance(value, torch.Tensor) and not running:
                    inputs.setdefault(id(value), value)
            running.append(index)
        return hook

    def leave(*_: Any) -> None:  # returns None: a forward hook's value would replace the unit's output
        running.pop()

    for index, unit in enumerate(m for m in model.modules() if type(m).__name__ in arch.block_classes):
        unit.register_forward_pre_hook(enter(index), with_kwargs=True)
        unit.register_forward_hook(leave)
    if trains == "lora":
        for _, layer in adapted_layers(model, arch):
            layer.register_forward_hook(adapted)
    noisy = batch["latents"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_like):
        arch.call(model, noisy, torch.ones(1, device="meta"), batch)
    per_unit: dict[int | None, float] = dict(extra)
    for tensor, unit in saved.values():
        per_unit[unit] = per_unit.get(unit, 0.0) + tensor.numel() * tensor.element_size()
    outside = per_unit.pop(None, 0.0)
    counted = {key for key, (_, unit) in saved.items() if unit is None}
    kept = sum(t.numel() * t.element_size() for key, t in inputs.items() if key not in counted)
    return outside + sum(per_unit.values()), outside + kept + max(per_unit.values(), default=0.0)


def measure_whole(name: str, *, tiny: bool, resolution: int, world_sizes: tuple[int, ...]) -> list[Row]:
    """Every mode of a UNet family, measured on the whole model (see the module's text)."""
    from simpletuner.train.quantize import quantize_module

    arch = ARCHITECTURES[name]
    config = dict(arch.model_config(tiny))
    activations = unit_activations(arch, config, resolution, tiny)
    trained_all = unit_activations(arch, config, resolution, tiny, "full")
    model = _build_whole(arch, config)
    bf16 = float(tensor_bytes(model))
    lora = float(sum(lora_layer_weights(layer) for _, layer in adapted_layers(model, arch)))
    rows = [Row(name, "lora-bf16", bf16 + 4 * lora, 4 * lora, 8 * lora, *activations)]
    state = model.state_dict()
    del model
    for precision, mode in (("int8-quanto", "lora-int8"), ("nf4-bnb", "lora-nf4")):
        quantised = _build_whole(arch, config)
        quantised.load_state_dict(state)
        quantize_module(quantised, precision)
        rows.append(Row(name, mode, tensor_bytes(quantised) + 4 * lora, 4 * lora, 8 * lora, *activations))
        del quantised
    return rows + full_rows(name, bf16 / 2, trained_all, world_sizes)


def lora_step(name: str, resolution: int, precision: str, *, device: str = "cuda", tiny: bool = False,
              swap: int = 0) -> float:
    """One real LoRA step (bf16 base, quantised as `precision`; fp32 LoRA; AdamW; every block checkpointed where
    the model has diffusers' checkpointing, as the estimate's total assumes; the last `swap` blocks under block
    swap) of the whole model on `device`; on CUDA returns torch.cuda.max_memory_allocated in bytes, elsewhere
    the loss."""
    from peft import LoraConfig

    from simpletuner.train.block_swap import swap_blocks
    from simpletuner.train.checkpointing import enable_checkpointing
    from simpletuner.train.quantize import quantize_module

    arch = ARCHITECTURES[name]
    model = build_model(arch, tiny=tiny, device=device, dtype=torch.bfloat16).requires_grad_(False)
    if precision != "no_change":
        quantize_module(model, precision)
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(arch.lora_targets)))
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.data = p.data.float()
    swapped = swap_blocks(model, tuple(a for a, _ in BLOCK_LISTS[name]), swap, torch.device(device)) if swap else ()
    if swap and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the swapped weights' device copies are gone
    enable_checkpointing(model, self_checkpointed=swapped)
    model.train()
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    batch = {k: v.to(device, torch.bfloat16 if v.is_floating_point() else v.dtype)
             for k, v in make_batch(arch, batch=1, resolution=resolution, tiny=tiny).items()}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(torch.device(device).type, torch.bfloat16):
        prediction = arch.call(model, batch["latents"], torch.ones(1, device=device), batch)
    loss = prediction.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    if not cuda:
        return float(loss)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def table(rows: list[Row], anchors: bool = True, unit: tuple[str, int] = ("GiB", GIB)) -> str:
    lines = ["| model | mode | parameters | gradients | optimiser | activations | activations, checkpointed "
             "| total (checkpointed) | SimpleTuner | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base_mode = row.mode.split(" swap ")[0]
        anchor, goal = ANCHORS.get(base_mode, ("", "")) if anchors and row.model == "flux" else ("", "")
        cells = [row.parameters, row.gradients, row.optimizer, row.activations, row.checkpointed, row.total]
        lines.append(f"| {row.model} | {row.mode} | " + " | ".join(f"{c / unit[1]:.2f} {unit[0]}" for c in cells)
                     + f" | {f'~{anchor} GB' if anchor else ''} | {f'<= {goal} GB' if goal else ''} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=sorted([*BLOCK_LISTS, *WHOLE]),
                        help="repeatable (default: all)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--world-sizes", default="2,8", help="ranks for the sharded rows (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="the tiny configurations (a check of the script)")
    parser.add_argument("--gpu", action="store_true", help="also measure one real LoRA step on CUDA")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    worlds = tuple(int(w) for w in args.world_sizes.split(","))
    rows: list[Row] = []
    for name in args.model or [*BLOCK_LISTS, *WHOLE]:
        method = measure_whole if name in WHOLE else measure
        rows += method(name, tiny=args.tiny, resolution=args.resolution, world_sizes=worlds)
    text = table(rows, unit=("MiB", 1024**2) if args.tiny else ("GiB", GIB))
    print(text)
    peaks = []
    if args.gpu and torch.cuda.is_available():
        precisions = {"lora-bf16": "no_change", "lora-int8": "int8-quanto", "lora-nf4": "nf4-bnb"}
        for row in rows:
            mode, _, swap = row.mode.partition(" swap ")
            if mode in precisions:
                peak = lora_step(row.model, args.resolution, precisions[mode], swap=int(swap or 0))
                peaks.append(f"| {row.model} | {row.mode} | {peak / GIB:.2f} GiB | {row.total / GIB:.2f} GiB |")
                torch.cuda.empty_cache()
        print("\n".join(["| model | mode | max_memory_allocated | estimate |", "|---|---|---|---|", *peaks]))
    if args.record:
        record(text, peaks, args)
    return rows


def record(text: str, peaks: list[str], args: argparse.Namespace) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    lines = [f"\n## Training memory per family and mode, estimated on CPU ({when})\n",
             f"- machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}; {'tiny configurations' if args.tiny else f'{args.resolution} px, batch 1'}",
             f"- command: `{command}`",
             "- method: weights of a reduced-depth, full-width bf16 model quantised with the trainer's own "
             "function, counted per block and extrapolated by block count; activations saved for backward "
             "counted on the meta device at depth k and 2k (attention as flash attention saves it: q, k, v, "
             "output and log-sum-exp, no probability matrix); LoRA "
             f"rank {LORA_RANK} in fp32 with AdamW; full training fp32 + AdamW; sharded rows per rank, computed; "
             "'swap N' rows: the last N blocks' frozen weights in CPU memory (musubi_blocks_to_swap), the largest "
             "swapped block counted back as the one on the accelerator while it runs; UNets (sd15, sdxl) measured "
             "whole, checkpointing diffusers' ResnetBlock2D and BasicTransformerBlock units "
             "(see the script's docstring). SimpleTuner's column is its published Flux LoRA figure at 1024 px "
             "(whole process on a GPU), not measured here.\n", text]
    if peaks:
        lines += ["", "| model | mode | max_memory_allocated | estimate |", "|---|---|---|---|", *peaks]
    with args.results.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
