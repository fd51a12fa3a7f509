"""Analytic FLOPs of a denoiser forward and of a training step, and model FLOPs utilisation (MFU).

The formula
-----------
forward FLOPs = 2 x (multiply-accumulates of every matrix product), summed over
  * every Linear:     tokens x in_features x out_features
  * every Conv2d:     out_height x out_width x out_channels x (in_channels / groups) x kernel_h x kernel_w
  * every attention:  Q K^T and A V, each  batch x heads x query_tokens x key_tokens x head_dim
Norms, activations, softmax, RoPE and bias additions are left out (they are a fraction of a percent
here, and MFU conventionally counts only the matrix products).

It is counted, not estimated: the real diffusers module runs once on the `meta` device (shapes only,
no memory, no arithmetic; about 2 s at full size) under `torch.utils.flop_counter.FlopCounterMode`,
which adds 2 x MACs for every mm/addmm/bmm/convolution/attention op that the forward dispatches. So
every Linear, Conv2d and attention call the model really makes is counted with its real shapes.
Anchors it reproduces: SDXL UNet at 1024x1024 (77 text tokens) 6.76 TFLOP; Flux.1-dev at 1024x1024
with 512 text tokens 74.4 TFLOP (`flux_forward_flops_closed_form` derives the latter by hand).

training FLOPs per sample = forward x factor, factor = 3 for full training (forward, input gradients,
weight gradients), 2 for LoRA (forward and input gradients; the frozen base has no weight gradients and
the adapters' own products are negligible), plus 1 when gradient checkpointing recomputes the forward.

MFU = training FLOPs per step / (seconds per step x peak FLOP/s of the device). The peak used by default
is the datasheet's dense bf16 figure: 989 TFLOP/s for H100 SXM and for H200 (a bf16 8192^3 matmul
measures about 798 TFLOP/s on the H100 used here, so 0.81 is the practical ceiling of MFU).
"""

from __future__ import annotations

import functools

import torch

from benchmarks.architectures import VAE_SCALE, Architecture, build_model, get_architecture, make_batch

H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM5 datasheet, dense (no sparsity); H200 has the same tensor cores
# checked in order: the first key found in the CUDA device name wins
PEAK_TFLOPS_BY_DEVICE = {"H100 PCIe": 756.5, "H100": H100_BF16_DENSE_TFLOPS, "H200": H100_BF16_DENSE_TFLOPS}


def forward_flops(arch: Architecture | str, *, batch: int, resolution: int, tiny: bool = False) -> int:
    """FLOPs of one forward of the denoiser on `batch` samples at `resolution` (see module docstring)."""
    name = arch if isinstance(arch, str) else arch.name
    return batch * _forward_flops_per_sample(name, resolution, tiny)


@functools.lru_cache(maxsize=None)
def _forward_flops_per_sample(name: str, resolution: int, tiny: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    arch = get_architecture(name)
    model = build_model(arch, tiny=tiny, device="meta", dtype=torch.bfloat16)
    cpu_batch = make_batch(arch, batch=1, resolution=resolution, tiny=tiny)
    batch = {k: v.to("meta", torch.bfloat16) for k, v in cpu_batch.items()}
    timesteps = torch.full((1,), 500.0, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        arch.call(model, batch["latents"], timesteps, batch)
    return int(counter.get_total_flops())


def training_factor(mode: str, gradient_checkpointing: bool = False) -> int:
    """Training FLOPs per forward FLOP: 3 full, 2 LoRA, +1 with gradient checkpointing."""
    factors = {"full": 3, "lora": 2}
    if mode not in factors:
        raise ValueError(f"mode {mode!r}: expected one of {sorted(factors)}")
    return factors[mode] + (1 if gradient_checkpointing else 0)


def training_flops(
    arch: Architecture | str, *, mode: str, batch: int, resolution: int, tiny: bool = False,
    gradient_checkpointing: bool = False,
) -> int:
    """FLOPs of one optimiser step (one micro-batch of `batch` samples)."""
    fwd = forward_flops(arch, batch=batch, resolution=resolution, tiny=tiny)
    return fwd * training_factor(mode, gradient_checkpointing)


def mfu(step_flops: float, seconds_per_step: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when no peak is known (e.g. on a CPU)."""
    if not peak_tflops or seconds_per_step <= 0:
        return None
    return step_flops / seconds_per_step / (peak_tflops * 1e12)


def peak_tflops_for(device_name: str) -> float | None:
    """Datasheet dense bf16 peak for a CUDA device name, or None if unknown."""
    for key, value in PEAK_TFLOPS_BY_DEVICE.items():
        if key in device_name:
            return value
    return None


def flux_forward_flops_closed_form(
    resolution: int = 1024, text_tokens: int = 512, *, dim: int = 3072, mlp_ratio: int = 4,
    double_blocks: int = 19, single_blocks: int = 38, in_channels: int = 64, context_dim: int = 4096,
) -> int:
    """Flux forward FLOPs per sample by hand: the same formula, written out for the MMDiT blocks.

    Per token, a double block's stream does q, k, v, out (4 d^2) and an MLP (2 x mlp_ratio d^2);
    a single block does q, k, v (3 d^2), the MLP up-projection (mlp_ratio d^2) and a fused output
    projection from d + mlp_ratio d back to d. Joint attention over N = image + text tokens costs
    2 N^2 d MACs per block. Embedders, modulation and the final layer are included.
    """
    n_img = (resolution // VAE_SCALE // 2) ** 2
    n = n_img + text_tokens
    d = dim
    per_token_double = 4 * d * d + 2 * mlp_ratio * d * d
    per_token_single = 3 * d * d + mlp_ratio * d * d + (d + mlp_ratio * d) * d
    attention = 2 * n * n * d
    macs = double_blocks * (n * per_token_double + attention)
    macs += single_blocks * (n * per_token_single + attention)
    macs += n_img * in_channels * d + text_tokens * context_dim * d  # x_embedder, context_embedder
    macs += n_img * d * in_channels  # proj_out
    modulation = double_blocks * 2 * 6 * d * d + single_blocks * 3 * d * d + 2 * d * d  # adaLN, norm_out
    embedders = 3 * (256 * d + d * d) + 768 * d + d * d  # time, guidance, pooled-text MLPs
    macs += modulation + embedders
    return 2 * macs
