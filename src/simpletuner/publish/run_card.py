"""The model card of a training run: gathers the card's facts as the run goes, writes README.md at the end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.publish.card import (CardInfo, DatasetLine, base_license, copy_card_images, existing_validation,
                                     write_card)
from simpletuner.train.events import NoEvents

if TYPE_CHECKING:
    from simpletuner.train.setup import Run


def output_kind(run: Run) -> str:
    """lora (diffusers' LoRA file) | peft (an adapter folder: families without a LoRA loader) | lycoris | full |
    controlnet (output_dir/controlnet/, full or with a LoRA fused in)."""
    if run.cfg.controlnet:
        return "controlnet"
    if run.trained.kind == "lora":
        return "lora" if run.family.lora_loader else "peft"
    return "lycoris" if run.trained.kind == "lycoris" else "full"


def card_info(run: Run, step: int, outputs: list[Path], images: dict[int, list[Path]]) -> CardInfo:
    """The card of `run` after `step` steps, with its validation images copied into output_dir."""
    from simpletuner.publish.metadata import summarize

    cfg = run.cfg
    output_dir = Path(cfg.output_dir)
    sizes = {name: len(data.latent_items) for name, data in run.data.datasets.items()}
    summary = summarize(cfg, run.family, run.components, step, datasets=run.settings.datasets, dataset_sizes=sizes)
    datasets = tuple(DatasetLine(name, sizes[name], tuple(f"{w}x{h}" for (w, h), n in zip(
        data.assignment.buckets, data.assignment.bucket_counts().tolist()) if n))
        for name, data in run.data.datasets.items())
    prompts = dict(run.validation.prompts) if run.validation else {}
    pipeline_class, controlnet_class = run.components.pipeline_class, ""
    if cfg.controlnet:  # e.g. StableDiffusionXLPipeline -> StableDiffusionXLControlNetPipeline
        pipeline_class = pipeline_class.removesuffix("Pipeline") + "ControlNetPipeline"
        controlnet_class = type(run.components["controlnet"]).__name__
    return CardInfo(
        summary=summary, pipeline_class=pipeline_class, output_kind=output_kind(run), controlnet_class=controlnet_class,
        output_files=tuple(p.relative_to(output_dir).as_posix() for p in outputs),
        folder_name=output_dir.name, hub_model_id=cfg.hub_model_id if cfg.push_to_hub else None,
        batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, optimizer=cfg.optimizer,
        mixed_precision=cfg.mixed_precision, datasets=datasets,
        images=tuple(copy_card_images(output_dir, images, prompts)),
        license=base_license(cfg.pretrained_model_name_or_path), note=cfg.model_card_note,
        safe_for_work=cfg.model_card_safe_for_work)


class ModelCardWriter(NoEvents):
    """Writes output_dir/README.md when training finishes (before the Hub upload reads it)."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.images: dict[int, list[Path]] = {}

    def on_start(self, run: Run, step: int) -> None:
        self.run = run
        self.images = existing_validation(Path(run.cfg.output_dir), step) if step else {}

    def on_validation(self, step: int, images: list[Path]) -> None:
        if images:
            self.images[step] = list(images)

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        assert self.run is not None, "on_start comes first"
        write_card(Path(self.run.cfg.output_dir), card_info(self.run, step, outputs, self.images))
