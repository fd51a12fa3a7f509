"""T5 prompt encoding as PixArt's and DeepFloyd IF's pipelines do it (encode_prompt, clean_caption=False).

Both pipelines lower-case and strip each caption, pad to a fixed length and pass the
attention mask to the encoder; caption cleaning (bs4, ftfy) is not used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig


def text_length(cfg: TrainingConfig, family_default: int, tokenizer: Any) -> int:
    """tokenizer_max_length if set, else the family's default clipped to the tokenizer's model_max_length."""
    if cfg.tokenizer_max_length:
        return cfg.tokenizer_max_length
    limit = getattr(tokenizer, "model_max_length", None) or family_default
    return min(family_default, int(limit))


def preprocess_captions(captions: Sequence[str]) -> list[str]:
    """What the pipelines' _text_preprocessing does with clean_caption=False."""
    return [caption.lower().strip() for caption in captions]


@torch.no_grad()
def encode_t5(tokenizer: Any, encoder: Any, captions: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """(last hidden state [B, L, D], attention mask [B, L]) of the captions, padded to max_length."""
    tokens = tokenizer(preprocess_captions(captions), padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device)
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
    return hidden, mask
