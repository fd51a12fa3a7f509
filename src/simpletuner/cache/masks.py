"""Loss masks: a mask image, prepared like its training image, reduced to latent size and cached.

A mask dataset (`conditioning_type: mask`) pairs each training image with a mask
file (see `data.pairing`). The mask goes through the image's own plan (resize,
crop, flip), so its pixels line up with the image's; its first channel, mapped from
[-1, 1] to [0, 1], is averaged down to the latent grid (area interpolation). White
trains, black is ignored, grey weighs in between: upstream SimpleTuner's masked loss.

Entries are keyed like latents: the mask file's identity, the transform and the
latent size, so a changed mask, crop or bucket is a miss, never a stale hit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from simpletuner.cache.keys import KEY_VERSION, SourceIdentity, Transform, stable_hash
from simpletuner.data.records import ImagePlan, ImageRecord

if TYPE_CHECKING:
    import torch

    from simpletuner.cache.jobs import CacheSummary
    from simpletuner.cache.store import TensorStore

MASK = "mask"  # the entry's tensor name: float32 [1, h, w] in [0, 1]


def mask_key(source: SourceIdentity, transform: Transform, latent_size: tuple[int, int]) -> str:
    """Key of a mask entry: which file, how it was prepared, and the latent (height, width)."""
    return stable_hash({"v": KEY_VERSION, "kind": "mask", "source": source.document(),
                        "transform": transform.document(), "latent": list(latent_size)})


def latent_mask(pixels: "torch.Tensor", latent_size: tuple[int, int]) -> "torch.Tensor":
    """(3, H, W) pixels in [-1, 1] -> (1, h, w) weights in [0, 1]: first channel, area-averaged."""
    import torch.nn.functional as F

    weights = (pixels[:1].float() + 1) / 2
    return F.interpolate(weights[None], size=tuple(latent_size), mode="area")[0].clamp_(0, 1)


@dataclass(frozen=True)
class MaskItem:
    """The mask of one training image: its file, the image's plan and flip, its key."""

    key: str
    source: str  # local path or fsspec URL of the mask file
    plan: ImagePlan
    latent_size: tuple[int, int]  # (height, width)
    flip: bool = False


def mask_item(location: str, record: ImageRecord, plan: ImagePlan, scale: int, flip: bool = False) -> MaskItem:
    """The item of the mask file `record` (under `location`) for an image planned as `plan`; `scale` is the
    number of pixels per latent cell."""
    width, height = plan.target_size
    latent_size = (height // scale, width // scale)
    key = mask_key(SourceIdentity.of(location, record), Transform.of(plan, flip), latent_size)
    if "://" in location:
        url = f"{location.rstrip('/')}/{record.path}"
    else:
        url = os.path.join(location, *record.path.split("/"))
    return MaskItem(key, url, plan, latent_size, flip)


def cache_masks(items: Sequence[MaskItem], store: "TensorStore", storage_options: dict[str, Any] | None = None,
                read_source: Callable[[str], bytes] | None = None, **job_options: Any) -> "CacheSummary":
    """Store the masks the store lacks (split across ranks, resumable); an unreadable mask is a failure record."""
    from simpletuner.cache.jobs import WorkItem, run_cache_job
    from simpletuner.cache.latents import load_pixels

    def load(item: MaskItem) -> "torch.Tensor":
        source = read_source(item.source) if read_source is not None else item.source
        return latent_mask(load_pixels(source, item.plan, item.flip, storage_options), item.latent_size)

    works = [WorkItem(item.key, item, group=item.latent_size, source=item.source) for item in items]
    return run_cache_job(works, store, lambda masks: [{MASK: mask} for mask in masks], load=load,
                         collate=list, batch_size=64, kind="masks", unit="mask", **job_options)
