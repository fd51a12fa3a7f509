"""Quantise frozen weights after loading, before the adapter is added.

`base_model_precision` quantises the denoiser, `text_encoder_N_precision` text encoder N, each
with its library (config.quantisation.LIBRARY): optimum-quanto swaps layers for its QLinear /
QConv2d, torchao turns Linear weights into its quantised tensors (weight-only int8, or float8
weights and activations on CUDA), bitsandbytes swaps Linear layers for 4-bit NF4 ones. peft
wraps each of these, so LoRA trains beside the frozen quantised weights and the adapter loads
on the unquantised model. The first and last projections, the embedders and the final norm
stay in their dtype (SimpleTuner's exclusions for Flux, and the timestep embedders).
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from simpletuner.config.quantisation import CUDA_ONLY, LIBRARY, missing_libraries, requested
from simpletuner.errors import UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.models.base import Components, ModelFamily

logger = get_logger(__name__)

# layers kept in their dtype, by full name: input and output projections, embedders, the final norm's
# modulation; the norms' own weights are never quantised (their adaLN linears are: most of Flux's weights)
KEEP = ("proj_out", "x_embedder", "context_embedder", "norm_out*", "*pos_embed*", "conv_in", "conv_out",
        "*time_text_embed*", "*time_embed*", "*time_embedding*", "*timestep_embed*", "time_proj")
QUANTO_TYPES = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8",
                "fp8uz-quanto": "qfloat8_e4m3fnuz"}


def _kept(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in KEEP)


def _quanto(module: nn.Module, precision: str) -> None:
    import optimum.quanto as quanto

    excluded = [name for name, _ in module.named_modules() if name and _kept(name)]
    quanto.quantize(module, weights=getattr(quanto, QUANTO_TYPES[precision]), exclude=excluded)
    quanto.freeze(module)


def _torchao(module: nn.Module, precision: str) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8DynamicActivationFloat8WeightConfig()

    def wanted(layer: nn.Module, name: str) -> bool:  # torchao's kernels want sizes divisible by 16
        return (isinstance(layer, nn.Linear) and not _kept(name)
                and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)

    quantize_(module, config, filter_fn=wanted)


def _nf4(module: nn.Module, prefix: str = "") -> None:
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Linear and not _kept(path):
            weight = child.weight
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=weight.dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            # bitsandbytes repacks CPU weights for inference at the first eval-mode forward (validation), after
            # which its matmul adds the bias in place and backward fails: keep the trainable layout
            layer.support_avx512bf16_for_cpu = False
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer.to(weight.device))  # bitsandbytes quantises when it moves
        else:
            _nf4(child, path)


def quantize_module(module: nn.Module, precision: str) -> nn.Module:
    """Quantise `module`'s frozen weights in place to `precision` (a SimpleTuner precision name)."""
    module.requires_grad_(False)
    library = LIBRARY[precision].package
    if library == "optimum-quanto":
        _quanto(module, precision)
    elif library == "torchao":
        _torchao(module, precision)
    else:
        _nf4(module)
    return module.requires_grad_(False)  # the quantised layers' new parameters are frozen too


def _targets(family: ModelFamily, cfg: Any) -> dict[str, str]:
    """component name -> precision, for every *_precision option that quantises."""
    targets = {}
    for option, precision in requested(cfg).items():
        if option == "base_model_precision":
            targets[family.denoiser_name()] = precision
        else:
            number = int(option.split("_")[2])
            targets["text_encoder" if number == 1 else f"text_encoder_{number}"] = precision
    return targets


def check_quantisation(cfg: Any, device: torch.device) -> None:
    """UserError when a requested precision's library is missing or cannot run on `device`."""
    problems = missing_libraries(cfg)
    problems += [f"{name} = {precision!r} cannot run on {device.type}: {CUDA_ONLY[precision]}"
                 for name, precision in requested(cfg).items() if precision in CUDA_ONLY and device.type != "cuda"]
    if problems:
        raise UserError("; ".join(problems))


def quantize_components(family: ModelFamily, components: Components, cfg: Any, device: torch.device) -> list[str]:
    """Quantise the components the *_precision options name, on the CPU or on `device` as quantize_via says;
    returns the quantised components' names. A component the family lacks is an error."""
    check_quantisation(cfg, device)
    done = []
    for name, precision in _targets(family, cfg).items():
        module = components.get(name)
        if not isinstance(module, nn.Module):
            raise UserError(f"{'base_model_precision' if name == family.denoiser_name() else name + '_precision'}"
                            f" = {precision!r}: this {family.name} model has no {name} to quantise")
        module.to("cpu" if cfg.quantize_via in ("cpu", "pipeline") else device)
        quantize_module(module, precision)
        logger.info("quantised %s to %s on %s", name, precision, next(module.parameters()).device)
        done.append(name)
    return done
