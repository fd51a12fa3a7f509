"""How dataset entries refer to each other, and where each image dataset's caches live.

The trainer, the cache builder and `simpletuner config check` share these rules, so what
the check reports is what a run will do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from simpletuner.config.schema import DatasetConfig, TrainingConfig


@dataclass(frozen=True)
class TextCacheChoice:
    """The text-embedding cache an image dataset uses."""

    dataset_id: str | None  # the text_embeds entry, or None for the default location under cache_dir
    location: str  # folder or s3:// URL
    reason: str  # "named by text_embeds", "the default text_embeds dataset", ...


def _by_id(datasets: list[DatasetConfig]) -> dict[str, DatasetConfig]:
    return {d.id: d for d in datasets}


def _text_cache_location(entry: DatasetConfig, training: TrainingConfig) -> str:
    if entry.type == "aws":
        return entry.location()
    return entry.cache_dir or f"{training.cache_dir}/text/{entry.id}"


def default_text_embeds(datasets: list[DatasetConfig]) -> DatasetConfig | None:
    """The enabled text_embeds entry marked default, or the only enabled text_embeds entry."""
    text = [d for d in datasets if d.dataset_type == "text_embeds" and not d.disabled]
    defaults = [d for d in text if d.default]
    if defaults:
        return defaults[0]
    return text[0] if len(text) == 1 else None


def text_cache_for(dataset: DatasetConfig, datasets: list[DatasetConfig], training: TrainingConfig) -> TextCacheChoice:
    """Where `dataset`'s text embeddings are cached (assumes `reference_problems` found nothing)."""
    if dataset.text_embeds:
        entry = _by_id(datasets)[dataset.text_embeds]
        return TextCacheChoice(entry.id, _text_cache_location(entry, training), "named by text_embeds")
    entry = default_text_embeds(datasets)
    if entry is not None:
        return TextCacheChoice(entry.id, _text_cache_location(entry, training), "the default text_embeds dataset")
    return TextCacheChoice(None, f"{training.cache_dir}/text", "no text_embeds dataset: the default location "
                           "under cache_dir")


def latent_cache_for(dataset: DatasetConfig, training: TrainingConfig) -> str:
    """Where `dataset`'s VAE latents are cached."""
    return dataset.cache_dir_vae or f"{training.cache_dir}/vae/{dataset.id}"


def _reference(dataset: DatasetConfig, option: str, target_id: str, wanted_type: str,
               by_id: dict[str, DatasetConfig]) -> str | None:
    target = by_id.get(target_id)
    if target is None:
        known = ", ".join(sorted(i for i, d in by_id.items() if d.dataset_type == wanted_type)) or "none"
        return (f"dataset {dataset.id!r}: {option} {target_id!r} names no dataset; "
                f"{wanted_type} datasets: {known}")
    if target.dataset_type != wanted_type:
        return (f"dataset {dataset.id!r}: {option} {target_id!r} is a {target.dataset_type} dataset; "
                f"it must name a {wanted_type} dataset")
    if target.disabled:
        return f"dataset {dataset.id!r}: {option} {target_id!r} names a disabled dataset"
    return None


def reference_problems(datasets: list[DatasetConfig]) -> list[str]:
    """Duplicate ids, references to missing/disabled/wrong-kind datasets, no image dataset."""
    problems = [f"dataset id {name!r} is used {count} times; ids must be unique"
                for name, count in Counter(d.id for d in datasets).items() if count > 1]
    by_id = _by_id(datasets)
    enabled = [d for d in datasets if not d.disabled]
    for dataset in enabled:
        if dataset.text_embeds:
            problems.append(_reference(dataset, "text_embeds", dataset.text_embeds, "text_embeds", by_id))
        if dataset.conditioning_data:
            problems.append(_reference(dataset, "conditioning_data", dataset.conditioning_data, "conditioning",
                                       by_id))
    defaults = [d.id for d in enabled if d.dataset_type == "text_embeds" and d.default]
    if len(defaults) > 1:
        problems.append(f"several text_embeds datasets are marked default ({', '.join(defaults)}); mark one")
    if not any(d.dataset_type == "image" for d in enabled):
        problems.append("no enabled image dataset (dataset_type image): there is nothing to train on")
    return [p for p in problems if p]
