"""Paired datasets: conditioning inputs (masks, ControlNet) and regularisation images.

An image dataset (training or regularisation images, is_regularisation_data) names
its conditioning dataset through `conditioning_data`. Images pair with the
partner's files by relative path, ignoring the extension: `cats/01.jpg` <->
`cats/01.png`.
Unpaired files on either side are counted and reported, never dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig
    from simpletuner.data.buckets import SkipReport
    from simpletuner.data.records import ImageRecord

NO_PARTNER = "no conditioning image"  # the skip reason of an image whose partner file is missing
ASPECT_TOLERANCE = 0.01  # a conditioning image's aspect ratio may differ from its image's by this fraction


@dataclass(frozen=True)
class DatasetLink:
    """Image dataset `image` (training or regularisation images) takes its conditioning inputs from `partner`."""

    image: str  # id of the image dataset
    partner: str  # id of the conditioning dataset
    regularisation: bool = False  # the image dataset holds regularisation (prior-preservation) images

    @property
    def kind(self) -> str:
        return "regularisation conditioning" if self.regularisation else "conditioning"


def find_links(datasets: Iterable["DatasetConfig"]) -> list[DatasetLink]:
    """The conditioning_data links between enabled datasets, checked: the partner exists and is conditioning."""
    enabled = {dataset.id: dataset for dataset in datasets if not dataset.disabled}
    links = []
    for dataset in enabled.values():
        if not dataset.conditioning_data:
            continue
        partner = enabled.get(dataset.conditioning_data)
        if partner is None:
            raise ConfigError(f"dataset {dataset.id!r}: conditioning_data={dataset.conditioning_data!r} names no "
                              f"enabled dataset; ids are {sorted(enabled)}")
        if partner.dataset_type != "conditioning":
            raise ConfigError(f"dataset {dataset.id!r}: conditioning_data={partner.id!r} must name a dataset with "
                              f"dataset_type='conditioning' (it has dataset_type={partner.dataset_type!r})")
        links.append(DatasetLink(dataset.id, partner.id, dataset.is_regularisation_data))
    return links


def regularisation_datasets(datasets: Iterable["DatasetConfig"]) -> list[str]:
    """Ids of the enabled regularisation datasets (prior-preservation images)."""
    return [dataset.id for dataset in datasets if dataset.is_regularisation_data and not dataset.disabled]


def _pairing_key(path: str) -> str:
    return os.path.splitext(path)[0]


@dataclass
class Pairing:
    """Which image goes with which partner file, and what stayed alone on each side."""

    pairs: dict[str, str]  # image path -> partner path
    unpaired_images: list[str] = field(default_factory=list)
    unpaired_partners: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)  # keys with several partner files (e.g. a.png and a.jpg)

    def report(self, link: DatasetLink, examples: int = 3) -> str:
        lines = [f"{link.image} <-> {link.partner} ({link.kind}): {len(self.pairs)} pairs"]
        for label, items in (("images without a partner", self.unpaired_images),
                             (f"{link.partner} files without an image", self.unpaired_partners),
                             ("partner names matching several files", self.ambiguous)):
            if items:
                lines.append(f"  {len(items)} {label}, e.g. {', '.join(items[:examples])}")
        return "\n".join(lines)


def pair_by_path(images: Iterable[str], partners: Iterable[str]) -> Pairing:
    """Pair relative paths that are equal once their extensions are removed."""
    by_key: dict[str, list[str]] = {}
    for path in partners:
        by_key.setdefault(_pairing_key(path), []).append(path)
    pairs: dict[str, str] = {}
    unpaired: list[str] = []
    used: set[str] = set()
    for path in images:
        key = _pairing_key(path)
        candidates = by_key.get(key)
        if not candidates:
            unpaired.append(path)
            continue
        pairs[path] = sorted(candidates)[0]
        used.add(key)
    alone = sorted(path for key, paths in by_key.items() if key not in used for path in paths)
    ambiguous = sorted(key for key, paths in by_key.items() if len(paths) > 1)
    return Pairing(pairs, sorted(unpaired), alone, ambiguous)


def paired_records(images: list["ImageRecord"], partners: list["ImageRecord"], image_id: str, partner_id: str,
                   skips: "SkipReport") -> tuple[list["ImageRecord"], str | None]:
    """The image records that have a partner file (the others are added to `skips` with their paths), and a
    problem naming the pairs whose aspect ratios differ (the partner is resized to its image's plan, so its
    crop covers the same content only at the same aspect ratio), or None."""
    by_path = {record.path: record for record in partners}
    pairing = pair_by_path([record.path for record in images], list(by_path))
    for path in pairing.unpaired_images:
        skips.add(NO_PARTNER, 1, f"{path} (no {_pairing_key(path)}.* in {partner_id!r})")
    kept = [record for record in images if record.path in pairing.pairs]
    wrong = []
    for record in kept:
        partner = by_path[pairing.pairs[record.path]]
        image_aspect, partner_aspect = record.width / record.height, partner.width / partner.height
        if abs(image_aspect - partner_aspect) > ASPECT_TOLERANCE * image_aspect:
            wrong.append(f"{record.path} {record.width}x{record.height} <-> {partner.path} "
                         f"{partner.width}x{partner.height}")
    if not wrong:
        return kept, None
    return kept, (f"dataset {image_id!r}: {len(wrong)} image(s) cannot align with their conditioning image in "
                  f"{partner_id!r} (aspect ratios differ), e.g. {'; '.join(wrong[:3])}; give each conditioning "
                  "image its image's size or aspect ratio")
