"""The training loop on accelerate.

One optimiser update = `gradient_accumulation_steps` micro-batches from the
sampler. Every random choice of a micro-batch (noise, timesteps, caption choice
and dropout) comes from a generator seeded by (seed, step, micro-batch, rank), so
a resumed run draws exactly what the uninterrupted run would have drawn. The loss
and grad norm stay on the device until a logging step reads them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from simpletuner.log import LOOP_LOGGER, get_logger

if TYPE_CHECKING:
    from simpletuner.config.load import Settings
    from simpletuner.train.setup import Run

logger = get_logger(__name__)
loop_logger = get_logger(LOOP_LOGGER)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks)
    outputs: list[Path] = field(default_factory=list)


def train(settings: Settings) -> TrainResult:
    """Train as `settings` says; returns where the results are."""
    from simpletuner.train.setup import build_run, make_accelerator

    accelerator = make_accelerator(settings)
    run = build_run(settings, accelerator)
    try:
        return run_training(run)
    finally:
        run.tracker.finish()
        run.data.close()


def run_training(run: Run) -> TrainResult:
    """Resume if asked, then train to run.total_steps, checkpoint, validate and export."""
    from tqdm.auto import tqdm

    step = _resume(run)
    result = TrainResult(Path(run.cfg.output_dir), run.total_steps)
    empty_text = {name: tensor.to(run.device) for name, tensor in run.data.empty_text().items()}
    if step == 0 and run.validation is not None:
        _validate(run, 0)
    bar = tqdm(total=run.total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not run.accelerator.is_main_process)
    window = _Window()
    while step < run.total_steps:
        loss, grad_norm, wait = _update(run, step, empty_text)
        step += 1
        window.add(step, loss, grad_norm, wait, run.cfg.train_batch_size * run.cfg.gradient_accumulation_steps)
        if step % run.cfg.logging_steps == 0 or step == run.total_steps:
            result.losses.update(_log(run, window, bar))
        bar.update(1)
        if step % run.cfg.checkpointing_steps == 0 and step < run.total_steps:
            _save_checkpoint(run, step)
        if run.validation is not None and step % run.cfg.validation_steps == 0:
            _validate(run, step)
    bar.close()
    _save_checkpoint(run, step)
    result.outputs = _export(run, step)
    return result


# ------------------------------------------------------------------ one update
def _update(run: Run, step: int, empty_text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser update; returns (loss, grad norm) as device tensors, and seconds spent waiting for data."""
    cfg = run.cfg
    accumulation = cfg.gradient_accumulation_steps
    total = torch.zeros((), device=run.device)
    wait = 0.0
    for micro in range(accumulation):
        started = time.perf_counter()
        refs = next(run.sampler)
        seed = _micro_seed(cfg.seed, step, micro, run.accelerator.process_index)
        batch = run.data.batch(refs, run.family, run.components, random.Random(seed))
        wait += time.perf_counter() - started
        with run.accelerator.autocast():
            loss = _loss(run, batch, empty_text, seed)
        run.accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation
    _all_reduce_gradients(run)
    grad_norm = _clip(run)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(step + 1)
    return total, grad_norm, wait


def _loss(run: Run, raw: dict[str, Any], empty_text: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    from simpletuner.train.objectives import caption_keep_mask, training_loss

    device = run.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cpu_generator = torch.Generator().manual_seed(seed)
    raw = {key: _to(value, device) for key, value in raw.items()}
    mean, std, text = raw.pop("latent_mean"), raw.pop("latent_std"), raw.pop("text")
    latents = run.family.latents_from_distribution(run.components, mean, std, generator)
    keep = caption_keep_mask(latents.shape[0], run.cfg.caption_dropout_probability, cpu_generator).to(device)
    text, batch = run.family.drop_captions(run.components, text, empty_text, keep, raw)
    batch["latents"], batch["text"] = latents, text
    batch = run.family.draw_conditioning(run.components, batch, generator)
    draw = run.objective.draw(latents, generator)
    return training_loss(run.family, run.components, run.objective, batch, draw)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _micro_seed(seed: int | None, step: int, micro: int, rank: int) -> int:
    return hash((seed or 0, step, micro, rank)) & 0x7FFF_FFFF_FFFF


def _all_reduce_gradients(run: Run) -> None:
    """Average gradients over processes (one flat all-reduce; the model itself is never wrapped)."""
    world = run.accelerator.num_processes
    if world == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in run.trained.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def _clip(run: Run) -> torch.Tensor:
    """Clip as configured; returns the gradient norm (before clipping by norm) as a device tensor."""
    parameters = run.trained.parameters()
    if run.cfg.max_grad_norm > 0 and run.cfg.grad_clip_method == "norm":
        norm = run.accelerator.clip_grad_norm_(parameters, run.cfg.max_grad_norm)
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
    if run.cfg.max_grad_norm > 0:
        run.accelerator.clip_grad_value_(parameters, run.cfg.max_grad_norm)
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros((), device=run.device)


# ------------------------------------------------------------------ logging
@dataclass
class _Window:
    """What happened since the last logging step (device tensors until read)."""

    steps: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    wait: float = 0.0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, wait: float, samples: int) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.grad_norms.append(grad_norm.to(loss.device).float())
        self.wait += wait
        self.samples += samples

    def reset(self) -> None:
        self.steps, self.losses, self.grad_norms = [], [], []
        self.wait, self.samples, self.started = 0.0, 0, time.perf_counter()


def _log(run: Run, window: _Window, bar: Any) -> dict[int, float]:
    """Read the window's values (the only host synchronisation), log them, and reset the window."""
    losses = run.accelerator.reduce(torch.stack(window.losses), reduction="mean").tolist()
    norms = torch.stack(window.grad_norms).tolist()
    seconds = time.perf_counter() - window.started
    learning_rate = run.lr_scheduler.get_last_lr()[0]
    samples_per_second = window.samples * run.accelerator.num_processes / max(seconds, 1e-9)
    if run.accelerator.is_main_process:
        from simpletuner.train.trackers import training_scalars

        for step, loss, norm in zip(window.steps, losses, norms):
            last = step == window.steps[-1]
            run.tracker.log_scalars(training_scalars(
                loss=loss, learning_rate=learning_rate, grad_norm=norm,
                samples_per_second=samples_per_second if last else None,
                data_wait_seconds=window.wait if last else None), step)
        _append_metrics(run, window.steps, losses, norms, learning_rate)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
    loop_logger.debug("steps %s: %.2f samples/s, %.3f s waiting for data", window.steps, samples_per_second,
                      window.wait)
    logged = dict(zip(window.steps, losses))
    window.reset()
    return logged


def _append_metrics(run: Run, steps: list[int], losses: list[float], norms: list[float], lr: float) -> None:
    path = Path(run.cfg.output_dir) / "metrics.jsonl"
    with path.open("a") as handle:
        for step, loss, norm in zip(steps, losses, norms):
            handle.write(json.dumps({"step": step, "loss": loss, "grad_norm": norm, "lr": lr}) + "\n")


# ------------------------------------------------------------------ checkpoints, validation, export
def _checkpoint_parts(run: Run) -> dict[str, Any]:
    states: dict[str, Any] = {"optimizer": run.optimizer, "lr_scheduler": run.lr_scheduler}
    if run.ema is not None:
        states["ema"] = run.ema
    return {"modules": {"trained": run.trained.module}, "states": states,
            "rank_states": {"sampler": run.sampler}}


def _save_checkpoint(run: Run, step: int) -> Path:
    from simpletuner.publish.export import checkpoint_lora_writer
    from simpletuner.train.checkpoint import Progress, save_checkpoint

    return save_checkpoint(run.cfg.output_dir, Progress(step=step, epoch=run.sampler.epoch),
                           config=run.cfg.model_dump(mode="json"), identity=run.identity,
                           processes=run.processes, total_limit=run.cfg.checkpoints_total_limit,
                           write_extra=checkpoint_lora_writer(run, step), **_checkpoint_parts(run))


def _resume(run: Run) -> int:
    from simpletuner.train.checkpoint import load_checkpoint

    if run.resume_from is None:
        return 0
    progress = load_checkpoint(run.resume_from, identity=run.identity, processes=run.processes,
                               **_checkpoint_parts(run))
    logger.warning("resumed from %s at step %d", run.resume_from, progress.step)
    return progress.step


def _validate(run: Run, step: int) -> None:
    from simpletuner.train.optim import set_train_mode
    from simpletuner.validate import run_validation

    if run.accelerator.is_main_process:
        denoiser = run.family.denoiser(run.components)
        set_train_mode(run.optimizer, False)
        denoiser.eval()
        try:
            run_validation(run.validation, run.family, run.components, run.cfg, step, run.tracker,
                           _init_images(run))
        finally:
            denoiser.train()
            set_train_mode(run.optimizer, True)
    run.accelerator.wait_for_everyone()


def _init_images(run: Run) -> dict[tuple[int, int], Any]:
    """One training image per validation size, for img2img validation (the refiner), or its control image for a
    ControlNet; found once."""
    if run.init_images is None:
        from simpletuner.train.conditioning import control_image
        from simpletuner.train.data import training_image

        sizes = set(run.validation.resolutions) if run.validation else set()
        run.init_images = {}
        for data in run.data.datasets.values():
            for index, item in data.latent_items.items():
                target = item.plan.target_size
                if target in sizes and target not in run.init_images:  # a ControlNet samples from a control image
                    run.init_images[target] = control_image(data, index) if data.control else training_image(data,
                                                                                                             index)
                if len(run.init_images) == len(sizes):
                    return run.init_images
    return run.init_images


def _export(run: Run, step: int) -> list[Path]:
    from simpletuner.publish.export import export_model, run_metadata

    outputs: list[Path] = []
    if run.accelerator.is_main_process:
        outputs = export_model(run.family, run.components, run.trained, run.cfg, run.ema, run_metadata(run, step))
    run.accelerator.wait_for_everyone()
    return outputs
