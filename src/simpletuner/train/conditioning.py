"""ControlNet conditioning on the data road: each training image's control image, prepared alike and cached.

An image dataset names its conditioning dataset with `conditioning_data`; the scan keeps only images
that have a partner file (data.pairing). Each control image takes its image's ImagePlan (same resize,
same crop, same bucket), so the pair always aligns; its entry (the family's `control_entry`: pixels for
SD/SDXL) is cached in the conditioning dataset's latent cache under a content key like every other entry,
and read back through the same checked reader as latents (train.data): a pair whose control image cannot be
prepared or read leaves training and is listed in output_dir/skipped.jsonl, never replaced by another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from simpletuner.cache.keys import EncoderIdentity
from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.cache.jobs import CacheSummary, LazyCache
    from simpletuner.cache.latents import LatentItem
    from simpletuner.cache.store import TensorStore
    from simpletuner.data.scan import DatasetScan
    from simpletuner.config.load import Settings
    from simpletuner.config.schema import DatasetConfig
    from simpletuner.models.base import Components, ModelFamily

# the identity of pixel entries: what the family's control_entry stores (uint8 pixels, no encoder)
PIXEL_IDENTITY = EncoderIdentity(model="pixels", component="control", dtype="uint8", settings={"range": "0-255"})


@dataclass
class ControlData:
    """The control images of one image dataset: record index -> its control entry, and their store."""

    partner_id: str
    items: dict[int, LatentItem]
    store: TensorStore
    storage_options: dict[str, Any]
    reader: LazyCache | None = None  # the checked reader of the entries (control_reader), once cached


def partners_of(settings: Settings) -> dict[str, DatasetConfig]:
    """Image dataset id -> its conditioning dataset, for a ControlNet run; checked: every image dataset has one,
    and every conditioning dataset has its image dataset."""
    from simpletuner.data.pairing import find_links

    by_id = {dataset.id: dataset for dataset in settings.datasets}
    links = {link.image: by_id[link.partner] for link in find_links(settings.datasets)}
    images = [d.id for d in settings.datasets if d.dataset_type == "image" and not d.disabled]
    missing = [name for name in images if name not in links]
    if missing:
        raise ConfigError(f"controlnet=true trains on pairs: image dataset(s) {', '.join(map(repr, missing))} name no "
                          "conditioning dataset; set conditioning_data to the id of a dataset with "
                          "dataset_type='conditioning'")
    paired = {partner.id for partner in links.values()}
    alone = [d.id for d in settings.datasets
             if d.dataset_type == "conditioning" and not d.disabled and d.id not in paired]
    if alone:
        raise ConfigError(f"conditioning dataset(s) {', '.join(map(repr, alone))} are paired with no image dataset; "
                          "set conditioning_data on the image dataset they belong to, or disable them")
    masks = [f"{image!r} -> {partner.id!r}" for image, partner in links.items() if partner.conditioning_type == "mask"]
    if masks:
        raise ConfigError(f"controlnet=true: conditioning dataset(s) {', '.join(masks)} have conditioning_type='mask'; "
                          "a ControlNet trains on conditioning_type='controlnet' images")
    for dataset in settings.datasets:
        if dataset.id in links and dataset.vae_cache_clear_each_epoch:
            raise ConfigError(f"dataset {dataset.id!r}: vae_cache_clear_each_epoch with controlnet=true: the control "
                              "images are cached at the first epoch's crops; set vae_cache_clear_each_epoch=false")
    return links


def control_identity(family: ModelFamily, latent_identity: EncoderIdentity) -> EncoderIdentity:
    """What keys control entries: pixels, or the VAE's latents of them (families with `control_latents`)."""
    if not family.control_latents:
        return PIXEL_IDENTITY
    return replace(latent_identity, component="control", settings={**latent_identity.settings, "control": "vae"})


def control_data(partner: DatasetConfig, partner_scan: DatasetScan, records: Sequence[Any], plans: Sequence[Any],
                 indices: Sequence[int], settings: Settings, identity: EncoderIdentity) -> ControlData:
    """Control entries for the image records (their plans, in `indices` order), from the partner's files."""
    from simpletuner.cache.latents import latent_items
    from simpletuner.cache.location import storage_options_for
    from simpletuner.cache.store import TensorStore
    from simpletuner.config.references import latent_cache_for
    from simpletuner.data.pairing import pair_by_path

    partner_records = {record.path: record for record in partner_scan.result.index.records()}
    pairs = pair_by_path([record.path for record in records], list(partner_records)).pairs
    matched = [partner_records[pairs[record.path]] for record in records]  # the scan kept only paired images
    items = latent_items(partner_scan.storage.url, matched, list(plans), identity)
    location = latent_cache_for(partner, settings.training)
    store = TensorStore(location, storage_options=storage_options_for(location, partner))
    options = storage_options_for(partner.location(), partner if partner.type == "aws" else None)
    return ControlData(partner.id, dict(zip(indices, items)), store, options)


def control_encoder(family: ModelFamily, components: Components) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """What prepares control entries from control pixels: the family's `control_entry`, on the CPU."""

    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: tensor.cpu() for name, tensor in family.control_entry(components, pixels).items()}

    return encode


def cache_control(control: ControlData, family: ModelFamily, components: Components, *, batch_size: int,
                  progress: bool) -> CacheSummary:
    """Prepare and store the control entries the store lacks; failures are reported by the cache job."""
    from simpletuner.cache.latents import cache_latents

    items = sorted(control.items.values(), key=lambda item: item.source)
    return cache_latents(items, control.store, control_encoder(family, components), batch_size=batch_size,
                         storage_options=control.storage_options, progress=progress)


def control_reader(control: ControlData, encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> LazyCache:
    """The control entries' reader: each entry's length and CRC checked on first read, a corrupt one encoded
    again from its control image (the same checks as the latents')."""
    from simpletuner.cache.latents import lazy_latents

    return lazy_latents(control.store, encode, control.storage_options)


def control_image(data: Any, index: int) -> Any:
    """The control image of a training image (record `index` of a DatasetData), as trained, as a PIL image."""
    from PIL import Image

    from simpletuner.cache.latents import load_pixels

    item = data.control.items[index]
    pixels = load_pixels(item.source, item.plan, storage_options=data.control.storage_options)
    array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def eval_controls(datasets: dict[str, Any], count: int) -> list[tuple[str, Any, tuple[int, int]]]:
    """`num_eval_images`: the first `count` control images of the image datasets' conditioning partners (datasets
    in order, pairs by their image's path), each as trained: (its image's file name without the extension, the
    control image, its trained size)."""
    from pathlib import PurePosixPath

    controls: list[tuple[str, Any, tuple[int, int]]] = []
    for data in datasets.values():
        if data.control is None:
            continue
        usable = [i for i in data.control.items if i in data.latent_items and i not in data.failed]
        for index in sorted(usable, key=lambda i: data.latent_items[i].source):
            if len(controls) == count:
                return controls
            item = data.latent_items[index]
            controls.append((PurePosixPath(item.source).stem, control_image(data, index), item.plan.target_size))
    return controls
