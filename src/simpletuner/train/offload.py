"""Frozen encoders leave the accelerator once their caches are complete.

Training reads text embeddings and latents from the caches, so the text encoders, and the VAE
when no dataset encodes latents during training (vae_cache_ondemand, re-encoding every epoch),
wait in CPU memory; validation, which renders through the pipeline, brings them back for its
duration only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components
    from simpletuner.train.data import TrainingData


@dataclass
class Parked:
    """Components kept on `home` (the CPU) while training runs on `device`."""

    components: Components
    names: list[str]
    device: torch.device
    home: torch.device = torch.device("cpu")

    def _move(self, where: torch.device) -> None:
        for name in self.names:
            self.components[name].to(where)

    def park(self) -> Parked:
        self._move(self.home)
        return self

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The parked components on the training device for the block's duration (validation)."""
        self._move(self.device)
        try:
            yield
        finally:
            self._move(self.home)


def vae_needed_in_training(data: TrainingData, on_demand: bool) -> bool:
    """True when a dataset encodes latents while training (on demand, or again every epoch)."""
    return on_demand or any(d.reencode_each_epoch for d in data.datasets.values())


def park_encoders(components: Components, data: TrainingData, device: torch.device, cfg: TrainingConfig) -> Parked:
    """Move the frozen encoders the training step does not use off `device`; returns how to bring them back.

    Text encoders that train (train_text_encoder) stay. A parked encoder still works where it is: a
    corrupt cache entry found while training is encoded again there (slower, on the CPU)."""
    names = [name for name, module in components.modules.items()
             if name.startswith("text_encoder") and isinstance(module, nn.Module) and not cfg.train_text_encoder]
    if isinstance(components.get("vae"), nn.Module) and not vae_needed_in_training(data, cfg.vae_cache_ondemand):
        names.append("vae")
    return Parked(components, names, device).park()
