"""ControlNet: a trainable copy of the base denoiser's encoder that steers the frozen denoiser.

`attach_controlnet` builds the ControlNet of a run (from `controlnet_model_name_or_path`, or from the
base's denoiser through the family's `controlnet_from_denoiser`), puts it into the components as
"controlnet" and freezes the base denoiser. A family declares the capability with `controlnet_loader`
(the diffusers class that loads a saved ControlNet) and implements `controlnet_from_denoiser`,
`predict_with_controlnet` and a ControlNet pipeline; families without one are refused by name.

The control image reaches the ControlNet as the family's `control_entry` says: SD 1.x/2.x and SDXL
ControlNets take pixels in [0, 1] (as diffusers' train_controlnet.py feeds them), cached as uint8; SD3's,
Flux's and Hunyuan-DiT's take a VAE latent of the control image (`control_latents`), cached as the VAE's distribution
and drawn each step, as diffusers' train_controlnet_sd3.py and train_controlnet_flux.py do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from simpletuner.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components, ModelFamily

CONTROLNET = "controlnet"  # the component name, in Components and in diffusers' ControlNet pipelines


def check_controlnet_family(family: ModelFamily, cfg: TrainingConfig | None = None) -> None:
    """Raise UserError naming the family when it has no ControlNet (or the adapter cannot go on one)."""
    if cfg is not None and cfg.model_type == "lora" and cfg.lora_type == "lycoris":
        raise UserError("controlnet=true with lora_type='lycoris': a ControlNet trains in full (model_type='full') "
                        "or with a LoRA (lora_type='standard')")
    if cfg is not None and cfg.train_text_encoder:
        raise UserError("controlnet=true with train_text_encoder=true: the ControlNet export holds the ControlNet "
                        "only, so trained text encoders would be lost; set train_text_encoder=false")
    if family.controlnet_loader is None:
        from simpletuner.models.registry import family_names

        able = [name for name in family_names() if _has_controlnet(name)]
        raise UserError(f"controlnet=true: model_family {family.name!r} has no ControlNet training in this version; "
                        f"ControlNet training takes {', '.join(able)}")


def _has_controlnet(name: str) -> bool:
    from simpletuner.models.registry import get_family

    return get_family(name).controlnet_loader is not None


def attach_controlnet(family: ModelFamily, components: Components, cfg: TrainingConfig) -> nn.Module:
    """Build the run's ControlNet into components["controlnet"] (once: a later call returns it); the base
    denoiser is frozen.

    The ControlNet trains in fp32 (model_type full) or in the frozen dtype under a LoRA. Built before the base is
    quantised (`base_model_precision`), it copies the base's full-precision weights and stays unquantised.
    """
    from simpletuner.config.schema import trains_adapter

    if CONTROLNET in components.modules:
        return components.modules[CONTROLNET]
    check_controlnet_family(family)
    denoiser = family.denoiser(components)
    denoiser.requires_grad_(False)
    if cfg.controlnet_model_name_or_path:
        controlnet = load_controlnet(family, cfg.controlnet_model_name_or_path)
    else:
        controlnet = family.controlnet_from_denoiser(components)
    dtype = denoiser.dtype if trains_adapter(cfg) else torch.float32
    controlnet.to(device=denoiser.device, dtype=dtype)
    components.modules[CONTROLNET] = controlnet
    return controlnet


def load_controlnet(family: ModelFamily, path: str) -> nn.Module:
    """A saved ControlNet (a folder with config.json, or a model folder with a controlnet/ subfolder, or a Hub id)."""
    from simpletuner.models.base import _from_pretrained, _local_only

    module, _, attr = str(family.controlnet_loader).partition(":")
    loader = getattr(__import__(module, fromlist=[attr]), attr)
    local = Path(path).expanduser()
    subfolder = CONTROLNET if (local / CONTROLNET / "config.json").is_file() else None
    if local.exists() and subfolder is None and not (local / "config.json").is_file():
        raise UserError(f"controlnet_model_name_or_path={path!r}: no config.json there (nor in {CONTROLNET}/); "
                        "point it at a folder written by a ControlNet's save_pretrained")
    return _from_pretrained(loader, path, CONTROLNET, local_files_only=_local_only(path), subfolder=subfolder)


def pixel_control(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cache entry of control images as pixels: (B, 3, H, W) in [-1, 1] -> uint8 in [0, 255]."""
    return {"control": ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)}


def control_pixels(entry: torch.Tensor) -> torch.Tensor:
    """uint8 control pixels -> float in [0, 1], what torchvision's ToTensor gives diffusers' training script."""
    return entry.float() / 255.0


def conditioning_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The control-image embedding's channels that downsample pixels to latents: diffusers' default
    (16, 32, 96, 256) downsamples 8x (three strided convolutions), one entry fewer per halving less."""
    steps = max(vae_scale_factor.bit_length() - 1, 0)
    channels = (16, 32, 96, 256, 256, 256)
    if 2 ** steps != vae_scale_factor or steps + 1 > len(channels):
        raise UserError(f"ControlNet: a VAE scale factor of {vae_scale_factor} is not a power of two up to 32")
    return channels[: steps + 1]


# diffusers' names of the layers a ControlNet adds to its copy of the denoiser (UNet, SD3, Flux, Hunyuan-DiT)
CONTROL_LAYERS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block", "controlnet_blocks",
                  "pos_embed_input", "controlnet_single_blocks", "controlnet_x_embedder", "input_block")


def controlnet_lora_targets(controlnet: nn.Module, denoiser_targets: list[str]) -> list[str]:
    """LoRA targets on a ControlNet: the family's denoiser targets, plus every convolution of the control layers
    and linear layers of the control layers (the control-image embedding and the zero-initialised output
    layers), without which the residuals would stay zero."""
    from torch import nn as torch_nn

    control = [name for name, module in controlnet.named_modules()
               if isinstance(module, (torch_nn.Conv2d, torch_nn.Linear)) and name.startswith(CONTROL_LAYERS)]
    return [*denoiser_targets, *control]
