"""Text-encoder training (train_text_encoder): which encoders train, how, and their outputs in the step.

SD 1.x/2.x and SDXL train their CLIP text encoders beside the UNet, Kolors its ChatGLM: with
model_type lora each gets a peft LoRA on its attention projections (the family's
`text_encoder_lora_targets`; saved under `text_encoder.` / `text_encoder_2.` in the same LoRA
file, which diffusers' `load_lora_weights` loads);
with model_type full the whole encoder trains and the exported pipeline holds it. While
an encoder trains, its outputs are computed in each step from the batch's captions, so
the text cache (made by the frozen encoder) is not read for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from simpletuner.models.base import Components, ModelFamily


def prepare_text_encoders(family: ModelFamily, components: Components, cfg: Any) -> dict[str, nn.Module]:
    """Component name -> text encoder made trainable as cfg says; empty without train_text_encoder."""
    if not cfg.train_text_encoder:
        return {}
    names = family.trainable_text_encoders(components)
    if not names:
        raise ConfigError(f"train_text_encoder=true: model_family {cfg.model_family!r} does not train its text "
                          "encoder in this version (SD 1.x/2.x, SDXL and Kolors do); remove train_text_encoder")
    if "lora" in cfg.model_type and cfg.lora_type != "standard":
        raise ConfigError(f"train_text_encoder=true trains a peft LoRA on the text encoders, which lora_type "
                          f"{cfg.lora_type!r} cannot share; use lora_type 'standard' or remove train_text_encoder")
    encoders = {}
    for name in names:
        encoder = components[name]
        if "lora" in cfg.model_type:
            add_text_encoder_lora(encoder, cfg, family.text_encoder_lora_targets)
        else:
            encoder.requires_grad_(True)
        if cfg.freeze_encoder:
            freeze_layers(encoder, cfg.freeze_encoder_strategy, cfg.freeze_encoder_before, cfg.freeze_encoder_after)
        encoder.train()
        encoders[name] = encoder
    return encoders


def layer_is_frozen(layer: int, strategy: str, before: int, after: int) -> bool:
    """SimpleTuner's freeze_encoder_strategy for encoder layer `layer` (freeze_encoder_before/_after)."""
    if strategy == "before":
        return layer < before
    if strategy == "after":
        return layer > after
    if strategy == "between":
        return layer > before or layer < after
    if strategy == "outside":
        return before <= layer <= after
    raise ConfigError(f"freeze_encoder_strategy {strategy!r} is not one of 'before', 'between', 'after', 'outside'")


def freeze_layers(encoder: nn.Module, strategy: str, before: int, after: int) -> list[str]:
    """Stop the parameters of the encoder layers (`*.encoder.layers.<n>.*`) that the strategy names from
    training (adapters in them too); other parameters keep their setting. Returns the frozen names."""
    frozen = []
    for name, parameter in encoder.named_parameters():
        pieces = name.split(".")
        if "layers" not in pieces or pieces.index("layers") < 1 or pieces[pieces.index("layers") - 1] != "encoder":
            continue
        layer = pieces[pieces.index("layers") + 1]
        if layer.isdigit() and layer_is_frozen(int(layer), strategy, before, after) and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def add_text_encoder_lora(encoder: nn.Module, cfg: Any, targets: Sequence[str]) -> None:
    """A peft LoRA ("default") on the encoder's `targets` (its attention projections), with the UNet LoRA's
    settings."""
    from simpletuner.train.adapters import apply_lora

    apply_lora(encoder, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
               target_modules=targets, init=cfg.lora_init_type)


def encode_in_step(family: ModelFamily, components: Components,
                   captions: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Text outputs of the batch's captions and of the empty caption, from the encoders as they are now."""
    return family.text_outputs(components, list(captions)), family.text_outputs(components, [""])
