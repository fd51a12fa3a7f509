"""Masked loss in training: which mask file goes with which training image, and the batch's loss weights.

An image dataset whose `conditioning_data` names a `conditioning_type: mask` dataset
trains with its masks: each image pairs with the mask file of the same relative path
(extension aside, `data.pairing`), prepared with the image's own plan and cached at
latent size (`cache.masks`). An image without a mask file trains on all its pixels;
the scan report lists such images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from simpletuner.cache.masks import MaskItem
    from simpletuner.config.schema import DatasetConfig


def mask_partners(datasets: Iterable[DatasetConfig]) -> dict[str, DatasetConfig]:
    """Image dataset id -> its mask dataset; a mask dataset that no image dataset names is an error."""
    from simpletuner.data.pairing import find_links

    datasets = [dataset for dataset in datasets if not dataset.disabled]
    by_id = {dataset.id: dataset for dataset in datasets}
    partners = {link.image: by_id[link.partner] for link in find_links(datasets)
                if by_id[link.partner].conditioning_type == "mask"}
    named = {partner.id for partner in partners.values()}
    for dataset in datasets:
        if dataset.conditioning_type == "mask" and dataset.id not in named:
            raise ConfigError(f"dataset {dataset.id!r}: conditioning_type='mask' but no image dataset names it in "
                              "conditioning_data; set conditioning_data on the image dataset its masks belong to")
    for image_id, partner in partners.items():
        image = by_id[image_id]
        if partner.type == "huggingface":
            raise ConfigError(f"dataset {partner.id!r}: conditioning_type='mask' reads mask files; type "
                              "'huggingface' is not supported for masks: use a local or aws dataset")
        if image.vae_cache_clear_each_epoch:
            raise ConfigError(f"dataset {image_id!r}: vae_cache_clear_each_epoch cannot be combined with the masks "
                              f"of conditioning_data={partner.id!r} (conditioning_type='mask'): masks follow the "
                              "cached crop; remove one of the two")
    return partners


def mask_items_for(image_scan: Any, partner_scan: Any, latent_items: dict[int, Any], scale: int) -> dict[int, MaskItem]:
    """Record index -> the mask item of each training image that has a mask file."""
    from simpletuner.cache.masks import mask_item
    from simpletuner.data.pairing import pair_by_path

    records = image_scan.assignment.records
    partner_records = {record.path: record for record in partner_scan.result.index.records()}
    pairs = pair_by_path((records[index].path for index in latent_items), partner_scan.usable_paths()).pairs
    location = partner_scan.storage.url
    items = {}
    for index, latent in latent_items.items():
        mask_path = pairs.get(records[index].path)
        if mask_path is not None:
            items[index] = mask_item(location, partner_records[mask_path], latent.plan, scale, latent.flip)
    return items


def batch_masks(entries: Sequence[dict[str, torch.Tensor] | None], like: torch.Tensor) -> torch.Tensor:
    """[B, 1, h, w] loss weights of a batch; a sample without a mask weighs 1 everywhere."""
    import torch

    from simpletuner.cache.masks import MASK

    shape = (1, *like.shape[-2:])
    return torch.stack([torch.ones(shape) if entry is None else entry[MASK].float() for entry in entries])

