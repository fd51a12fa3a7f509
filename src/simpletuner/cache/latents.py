"""VAE latents: the image transform, latent entries (mean and std), and the caching job.

An entry holds the latent distribution, {"mean": ..., "std": ...}, as the VAE
produced it; training draws a fresh latent per step with `sample_latent` and then
applies the family's scaling factor and shift (never stored, so one cache serves
any scaling). With flip augmentation the flipped image is its own entry: flip is
part of the key's transform.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Sequence

from simpletuner.cache.jobs import CacheSummary, EncodeFn, LazyCache, WorkItem, run_cache_job
from simpletuner.cache.keys import EncoderIdentity, SourceIdentity, Transform, latent_key
from simpletuner.data.records import ImagePlan, ImageRecord
from simpletuner.data.storage import RetryPolicy, read_fsspec_url

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from simpletuner.cache.store import TensorStore

# LANCZOS: the sharpest of Pillow's filters when downsampling (the usual case), and
# what SimpleTuner uses. Antialiased, so no moire from large sources.
RESAMPLE = "LANCZOS"
SourceReader = Callable[[str], bytes]  # a source URL -> the encoded image (for sources that are no files)


def prepare_image(image: "Image.Image", plan: ImagePlan, flip: bool = False) -> "torch.Tensor":
    """EXIF-transpose, RGB, resize to plan.resized_size (LANCZOS), crop plan.crop_box, flip.

    Returns a float32 tensor (3, height, width) in [-1, 1]. The trainer uses this too
    when it encodes on the fly, so cached and uncached pixels are identical.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    image = to_8bit(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != tuple(plan.resized_size):
        image = image.resize(tuple(plan.resized_size), getattr(Image.Resampling, RESAMPLE))
    image = image.crop(tuple(plan.crop_box))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# Single-channel modes wider than 8 bits, and the value that maps to 255. Pillow's convert() clips
# them to 0..255 (a 16-bit image turns almost white); multi-channel 16-bit PNGs (48/64-bit RGB/RGBA)
# already open as 8-bit RGB/RGBA (Pillow keeps the high byte of each sample).
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8bit(image: "Image.Image") -> "Image.Image":
    """An 8-bit grayscale image ("L") for a 16-bit, 32-bit integer or float one, scaled (not clipped).

    I;16* and I are read as 0..65535 (I is how 16-bit sources often arrive), F as 0..1;
    values outside the range are clipped. Other modes are returned unchanged.
    """
    import numpy as np
    from PIL import Image

    full = _FULL_SCALE.get(image.mode)
    if full is None:
        return image
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L")


def open_image(source: str | bytes | BinaryIO, storage_options: dict[str, Any] | None = None,
               retry: RetryPolicy | None = None) -> "Image.Image":
    """A fully decoded Pillow image from a local path, an fsspec URL (read with `retry`), bytes or a file object."""
    from PIL import Image

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, str) and "://" in source and not source.startswith("file://"):
        source = io.BytesIO(read_fsspec_url(source, storage_options, retry))
    image = Image.open(source)
    image.load()  # decode now, so a truncated file fails here and is reported
    return image


def load_pixels(source: str | bytes | BinaryIO, plan: ImagePlan, flip: bool = False,
                storage_options: dict[str, Any] | None = None) -> "torch.Tensor":
    """Open and prepare one image: (3, H, W) float32 in [-1, 1]."""
    return prepare_image(open_image(source, storage_options), plan, flip)


def sample_latent(entry: dict[str, "torch.Tensor"], generator: "torch.Generator | None" = None,
                  dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """A fresh draw mean + std * noise from a cached entry (batched entries work too).

    Computed in float32; returned in `dtype` (default: the mean's). The family's
    scaling factor and shift are applied by the caller.
    """
    import torch

    mean, std = entry["mean"], entry["std"]
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean.float() + std.float() * noise).to(dtype or mean.dtype)


def latent_entry(distribution: Any) -> dict[str, "torch.Tensor"]:
    """{"mean", "std"} of a diffusers DiagonalGaussianDistribution (`vae.encode(x).latent_dist`),
    or of a (mean, std) pair such as `ModelFamily.encode_images` returns."""
    if isinstance(distribution, (tuple, list)):
        mean, std = distribution
        return {"mean": mean, "std": std}
    return {"mean": distribution.mean, "std": distribution.std}


@dataclass(frozen=True)
class LatentItem:
    """One image to encode: where it is, how to transform it, and its key."""

    key: str
    source: str  # local path or fsspec URL of the file
    plan: ImagePlan
    flip: bool = False

    def work(self) -> WorkItem:
        return WorkItem(self.key, self, group=tuple(self.plan.target_size), source=self.source)


def latent_items(
    location: str,
    records: Sequence[ImageRecord],
    plans: Sequence[ImagePlan],
    encoder: EncoderIdentity,
    *,
    flip: bool = False,
    content_hashes: Sequence[str | None] | None = None,
) -> list[LatentItem]:
    """Items (and keys) for a dataset's images; with `flip`, each image's mirror too."""
    items = []
    for i, (record, plan) in enumerate(zip(records, plans, strict=True)):
        source = SourceIdentity.of(location, record, content_hashes[i] if content_hashes else None)
        url = _join(location, record.path)
        for flipped in (False, True) if flip else (False,):
            items.append(LatentItem(latent_key(source, Transform.of(plan, flipped), encoder), url, plan, flipped))
    return items


def _join(location: str, path: str) -> str:
    if "://" in location:
        return f"{location.rstrip('/')}/{path}"
    return os.path.join(location, *path.split("/"))


def _stack(pixels: list["torch.Tensor"]) -> "torch.Tensor":
    import torch

    return torch.stack(pixels)


def _loader(storage_options: dict[str, Any] | None, read_source: SourceReader | None):
    """Pixels of an item: its source opened by fsspec (with `storage_options`), or read by `read_source`."""
    if read_source is None:
        return lambda item: load_pixels(item.source, item.plan, item.flip, storage_options)
    return lambda item: load_pixels(read_source(item.source), item.plan, item.flip)


def cache_latents(
    items: Iterable[LatentItem],
    store: "TensorStore",
    encode_fn: EncodeFn,
    *,
    batch_size: int = 8,
    storage_options: dict[str, Any] | None = None,
    read_source: SourceReader | None = None,
    **job_options: Any,
) -> CacheSummary:
    """Encode the items' images the store lacks (batched by target size) and store their entries.

    `encode_fn(pixels)` gets a (B, 3, H, W) float32 CPU tensor in [-1, 1] (it moves
    it to its device and dtype) and returns {"mean": (B, ...), "std": (B, ...)} (see
    `latent_entry`); out-of-memory errors halve the batch. A file that fails to
    open or decode is recorded and skipped. Sources that are no files (rows of a Hugging Face
    dataset) are read by `read_source(item.source)`. `job_options` go to `run_cache_job`
    (rank, world_size, num_workers, progress, shard_entries, ...).
    """
    return run_cache_job(
        [item.work() for item in items], store, encode_fn, load=_loader(storage_options, read_source),
        collate=_stack, batch_size=batch_size, kind="latents", unit="img", **job_options,
    )


def lazy_latents(store: "TensorStore", encode_fn: EncodeFn, storage_options: dict[str, Any] | None = None,
                 read_source: SourceReader | None = None, **options: Any) -> LazyCache:
    """A LazyCache of latents: `cache.get(item.work())` reads, or encodes and stores, one entry."""
    return LazyCache(store, encode_fn, load=_loader(storage_options, read_source), collate=_stack,
                     writer_name="lazy-latents", **options)
