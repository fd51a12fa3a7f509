"""The metadata every exported file carries: Stability AI's `modelspec.*` fields and a training summary.

Values are strings (safetensors headers hold str -> str). Nothing that names the training machine goes
in: a local base model is named by its folder's last part only, and no option holding a path, a
credential or an endpoint is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simpletuner.models.base import Components, ModelFamily

MODELSPEC_VERSION = "1.0.0"
SUMMARY_PREFIX = "simpletuner."


@dataclass(frozen=True)
class TrainingSummary:
    """What a file says about the run that made it."""

    base_model: str  # a Hub id, or a local folder's name (never its path)
    family: str  # model_family
    architecture: str  # modelspec architecture id of the base model, e.g. "stable-diffusion-xl-v1-base"
    title: str
    resolution: int  # the training resolution's side in pixels
    steps: int
    adapter: str = "lora"  # lora | full
    rank: int | None = None
    alpha: float | None = None
    use_dora: bool = False
    target: str | None = None  # the LoRA target preset
    trigger_words: tuple[str, ...] = ()
    datasets: dict[str, int] = field(default_factory=dict)  # dataset id -> images trained on


def base_model_name(source: str) -> str:
    """A Hub id as given; a local folder by its last part only."""
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        return path.resolve().name
    return source


def _folder_name(folder: str | None) -> str:
    """A run's output folder by its last part only (never its path)."""
    return Path(folder).expanduser().resolve().name if folder else ""


def resolution_side(resolution: float, resolution_type: str) -> int:
    """The side in pixels of the square a resolution setting means (area is in megapixels)."""
    if resolution_type == "area":
        return int(round(math.sqrt(resolution * 1_000_000)))
    return int(round(resolution))


def summarize(cfg: Any, family: ModelFamily, components: Components, steps: int, *,
              datasets: Sequence[Any] = (), dataset_sizes: Mapping[str, int] | None = None) -> TrainingSummary:
    """The summary of a run from its TrainingConfig, family, loaded components, its dataset entries
    (for their instance_prompt, the trigger words) and how many images each dataset gave."""
    adapter = "full" if "lora" not in cfg.model_type else cfg.lora_type
    lora = adapter == "standard"
    triggers = tuple(dict.fromkeys(d.instance_prompt for d in datasets if getattr(d, "instance_prompt", None)))
    target = family.adapter_preset_name(cfg) if lora else None
    resolution = (resolution_side(cfg.resolution, cfg.resolution_type) if cfg.resolution
                  else family.default_resolution(cfg))
    return TrainingSummary(
        base_model=base_model_name(cfg.pretrained_model_name_or_path), family=cfg.model_family,
        architecture=family.architecture(components),
        title=(cfg.tracker_run_name or _folder_name(cfg.output_dir)
               or f"{cfg.model_family} {'lora' if lora else adapter}"),
        resolution=resolution, steps=steps, adapter="lora" if lora else adapter,
        rank=cfg.lora_rank if lora else None,
        alpha=(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank) if lora else None,
        use_dora=bool(lora and cfg.use_dora), target=target, trigger_words=triggers,
        datasets=dict(dataset_sizes or {}))


def file_metadata(summary: TrainingSummary, *, date: datetime | None = None) -> dict[str, str]:
    """The safetensors header entries for a file of this run (str -> str)."""
    date = date or datetime.now(timezone.utc)
    kind = "lora" if summary.adapter == "lora" else summary.adapter
    side = summary.resolution
    entries: dict[str, Any] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": summary.architecture if kind == "full" else f"{summary.architecture}/{kind}",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": summary.title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.trigger_phrase": ", ".join(summary.trigger_words),
        f"{SUMMARY_PREFIX}base_model": summary.base_model,
        f"{SUMMARY_PREFIX}model_family": summary.family,
        f"{SUMMARY_PREFIX}adapter": summary.adapter,
        f"{SUMMARY_PREFIX}steps": summary.steps,
        f"{SUMMARY_PREFIX}lora_rank": summary.rank,
        f"{SUMMARY_PREFIX}lora_alpha": summary.alpha,
        f"{SUMMARY_PREFIX}use_dora": summary.use_dora if summary.adapter == "lora" else None,
        f"{SUMMARY_PREFIX}lora_target": summary.target,
        f"{SUMMARY_PREFIX}datasets": json.dumps(summary.datasets, sort_keys=True) if summary.datasets else None,
    }
    return {key: _text(value) for key, value in entries.items() if value is not None and value != ""}


def merged_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A LoRA's metadata for the base model's weights with that LoRA fused in: the base architecture
    (no "/lora"), and the summary marked as merged."""
    merged = {**metadata, f"{SUMMARY_PREFIX}adapter": "lora (merged)"}
    architecture = merged.get("modelspec.architecture")
    if architecture:
        merged["modelspec.architecture"] = architecture.removesuffix("/lora")
    return merged


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
