"""What a conditioning generator (`conditioning: [{type: canny}]`) needs from the rest of the configuration, read
by `config check` and by data.generators before a run makes any control image."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig, TrainingConfig


def generator_problems(training: TrainingConfig, dataset: DatasetConfig) -> list[str]:
    """One line per reason the dataset's conditioning generators cannot run ([] when it has none or they can)."""
    if not dataset.conditioning or dataset.disabled:
        return []
    problems = []
    if not training.controlnet:
        problems.append(f"dataset {dataset.id!r}: conditioning generators make ControlNet inputs; set "
                        "controlnet=true or remove conditioning")
    if len(dataset.conditioning) != 1:
        problems.append(f"dataset {dataset.id!r}: conditioning lists {len(dataset.conditioning)} generators; a "
                        "ControlNet trains on one")
    if str(training.cache_dir).startswith("s3://"):
        problems.append(f"dataset {dataset.id!r}: conditioning generators write their control images under a local "
                        f"cache_dir, and cache_dir={training.cache_dir!r} is on S3; set cache_dir to a local folder "
                        "(cache_dir_vae may stay on S3)")
    if dataset.conditioning_data:
        problems.append(f"dataset {dataset.id!r}: both conditioning (generated) and conditioning_data="
                        f"{dataset.conditioning_data!r}; keep one")
    return problems
