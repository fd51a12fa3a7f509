"""Encoder identities: what keys a cache entry to the exact encoder that produced it.

A Hub model is named by id and revision; a local folder by its resolved path and
the size and modification time of each weight file of the component (a cheap stat
that changes whenever the weights are replaced), so a retrained or swapped encoder
is a cache miss, never a stale hit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.cache.keys import EncoderIdentity, stable_hash
from simpletuner.config.quantisation import requested

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components, ModelFamily

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _local_weights_hash(source: str, component: str) -> str | None:
    """A hash of (name, size, mtime) of the component's weight files, for local folders."""
    root = Path(source).expanduser()
    if not root.is_dir():
        return None
    folder = root / component if (root / component).is_dir() else root
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    stats = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return stable_hash({"folder": str(folder.resolve()), "files": stats})


def _identity(source: str, revision: str | None, components: list[str], module: Any,
              settings: dict[str, Any]) -> EncoderIdentity:
    dtype = str(getattr(module, "dtype", "none")).removeprefix("torch.")
    hashes = [_local_weights_hash(source, name) for name in components]
    weight_hash = stable_hash(hashes) if any(hashes) else None
    return EncoderIdentity(model=source, component="+".join(components) or "none", dtype=dtype,
                           revision=revision, weight_hash=weight_hash, settings=settings)


def latent_identity(family: ModelFamily, components: Components, cfg: TrainingConfig) -> EncoderIdentity:
    """The image encoder (the VAE; for pixel-space families, the family's own pixel transform)."""
    vae = components.get("vae")
    source = cfg.pretrained_vae_model_name_or_path or cfg.pretrained_model_name_or_path
    revision = None if cfg.pretrained_vae_model_name_or_path else cfg.revision
    settings = {"family": family.name, "stores": "distribution"}
    return _identity(source, revision, ["vae"] if vae is not None else [], vae, settings)


def text_identity(family: ModelFamily, components: Components, cfg: TrainingConfig) -> EncoderIdentity:
    """All of the family's text encoders together, with every setting that changes their outputs."""
    encoders = sorted(name for name, module in components.modules.items()
                      if name.startswith("text_encoder") and module is not None)
    settings = {"family": family.name, "encoders": encoders, **family.text_cache_settings(cfg)}
    quantised = {name: value for name, value in requested(cfg).items() if name.startswith("text_encoder")}
    if quantised:  # quantised encoders give other embeddings
        settings["quantised"] = quantised
    first = components.get(encoders[0]) if encoders else None
    return _identity(cfg.pretrained_model_name_or_path, cfg.revision, encoders, first, settings)
