"""The training loop on accelerate.

One optimiser update = `gradient_accumulation_steps` micro-batches from the
sampler. Every random choice of a micro-batch (noise, timesteps, caption choice
and dropout) comes from a generator seeded by (seed, step, micro-batch, rank), so
a resumed run draws exactly what the uninterrupted run would have drawn. The loss
and grad norm stay on the device until a logging step reads them. An update whose
loss or grad norm is not finite is skipped (see `nonfinite.py` for what that costs);
`max_nonfinite_steps` of them in a row stop the run. One run at a time may use an
output_dir (`runlock.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

from simpletuner.log import LOOP_LOGGER, get_logger
from simpletuner.train.events import NoEvents, TrainingEvents
from simpletuner.train.levers import attention_context

T = TypeVar("T")

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


def train(settings: Settings, events: TrainingEvents | None = None) -> TrainResult:
    """Train as `settings` says, telling `events` (on the main process) what happens; returns where the
    results are."""
    from simpletuner.train.runlock import run_lock
    from simpletuner.train.setup import build_run, check_output_dir, make_accelerator

    accelerator = make_accelerator(settings)
    events = events if events is not None and accelerator.is_main_process else NoEvents()
    try:
        check_output_dir(settings.training.output_dir)
        with run_lock(settings.training.output_dir, enabled=accelerator.is_main_process):
            run = build_run(settings, accelerator)
            try:
                return run_training(run, events)
            finally:
                run.tracker.finish()
                run.data.close()
    except BaseException as error:
        events.on_error(str(error) or type(error).__name__)
        raise
    finally:
        events.close()


def run_training(run: Run, events: TrainingEvents | None = None) -> TrainResult:
    """Resume if asked, then train to run.total_steps, checkpoint, validate and export."""
    from tqdm.auto import tqdm

    from simpletuner.train.nonfinite import NonFiniteGuard

    events = events or NoEvents()
    step = _resume(run)
    run.feed = _feed(run, step)
    if run.accelerator.is_main_process:  # metrics.jsonl describes this run: nothing after its first step
        _truncate_metrics(Path(run.cfg.output_dir) / "metrics.jsonl", step)
    result = TrainResult(Path(run.cfg.output_dir), run.total_steps)
    guard = NonFiniteGuard(run.cfg.max_nonfinite_steps, run.device)
    empty_text = {name: tensor.to(run.device) for name, tensor in run.data.empty_text().items()}
    events.on_start(run, step)
    bar = tqdm(total=run.total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not run.accelerator.is_main_process)
    if step == 0 and run.validation is not None:
        events.on_validation(0, _pause(bar, "validating the base model", lambda: _validate(run, 0)))
    window = _Window()
    try:  # the bar is closed before an error is printed below it
        while step < run.total_steps:
            update = _update(run, step, empty_text, guard)
            step += 1
            window.add(step, update, run.cfg.train_batch_size * run.cfg.gradient_accumulation_steps)
            if step % run.cfg.logging_steps == 0 or step == run.total_steps:
                result.losses.update(_log(run, window, bar))
                guard.check(step, lambda: _advice(run))
                events.on_progress(step, window.summary)
            bar.update(1)
            if step % run.cfg.checkpointing_steps == 0 and step < run.total_steps:
                guard.check(step, lambda: _advice(run))
                events.on_checkpoint(step, _pause(bar, "saving a checkpoint", lambda: _save_checkpoint(run, step)))
            if run.validation is not None and step % run.cfg.validation_steps == 0:
                events.on_validation(step, _pause(bar, "validating", lambda: _validate(run, step)))
    finally:
        bar.close()
        run.feed.close()
    guard.check(step, lambda: _advice(run))
    events.on_checkpoint(step, _save_checkpoint(run, step))
    result.outputs = _export(run, step)
    events.on_finish(step, result.outputs)
    return result


def _pause(bar: Any, doing: str, work: Callable[[], T]) -> T:
    """Say on the progress bar what the loop is doing while it does not step (validation, checkpoints);
    returns what `work` returns."""
    bar.set_postfix_str(f"{doing}…", refresh=True)
    done = work()
    bar.set_postfix_str("", refresh=True)
    return done


def _advice(run: Run) -> str:
    from simpletuner.train.checkpoint import list_checkpoints

    found = list_checkpoints(run.cfg.output_dir)
    where = f"; the last checkpoint is {found[-1]}" if found else "; no checkpoint was saved yet"
    return (f"{where}. Lower learning_rate (now {run.cfg.learning_rate:g}), check the data, or raise "
            "max_nonfinite_steps")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows after `step` (logged by an interrupted or earlier run), so this run does not repeat them."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _row_step(line) <= step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    temporary.replace(path)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# ------------------------------------------------------------------ one update
@dataclass
class _Update:
    """What one update leaves for logging: device tensors until a logging step reads them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # True: the loss or grad norm was not finite and the optimiser did not step
    learning_rate: float  # the rate this update used (host value: the scheduler lives on the host)
    wait: float  # seconds spent waiting for data


def _update(run: Run, step: int, empty_text: dict[str, torch.Tensor], guard: Any) -> _Update:
    """One optimiser update (skipped when its loss or gradient norm is not finite)."""
    cfg = run.cfg
    accumulation = cfg.gradient_accumulation_steps
    total = torch.zeros((), device=run.device)
    wait = 0.0
    for micro in range(accumulation):
        started = time.perf_counter()
        batch = run.feed.next(step, micro)
        wait += time.perf_counter() - started
        seed = _micro_seed(cfg.seed, step, micro, run.accelerator.process_index)
        with attention_context(run.levers):  # forward and backward: the same SDPA kernel
            with run.accelerator.autocast():
                loss = _loss(run, batch, empty_text, seed)
            run.sharding.before_backward(run.trained.parameters(), run.accelerator.num_processes,
                                         micro == accumulation - 1)
            run.sharding.backward(run.accelerator, loss / accumulation)
        total += loss.detach() / accumulation
    run.sharding.reduce_gradients(run.trained.parameters(), run.accelerator.num_processes)
    grad_norm = _clip(run)
    # with fp16, overflowing gradients are the GradScaler's to skip (see nonfinite.py)
    skipped = _agree(run, guard.flag(total, grad_norm, gradients=run.accelerator.scaler is None))
    learning_rate = run.lr_scheduler.get_last_lr()[0]
    guard.step(run.optimizer, skipped)
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(step + 1)
    return _Update(total, grad_norm, skipped, learning_rate, wait)


def _agree(run: Run, flag: torch.Tensor) -> torch.Tensor:
    """Every process skips when one does (its loss was not finite): a one-element all-reduce, no host read."""
    if run.accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    agreed = flag.to(torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed.bool()


def _loss(run: Run, raw: dict[str, Any], empty_text: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    from simpletuner.models.objectives import caption_keep_mask, training_loss

    device = run.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cpu_generator = torch.Generator().manual_seed(seed)
    raw = {key: _to(value, device) for key, value in raw.items()}
    mean, std, text = raw.pop("latent_mean"), raw.pop("latent_std"), raw.pop("text")
    captions = raw.pop("captions", None)
    latents = run.family.latents_from_distribution(run.components, mean, std, generator)
    keep = caption_keep_mask(latents.shape[0], run.cfg.caption_dropout_probability, cpu_generator).to(device)
    if run.trained.text_encoders:  # trained encoders: their outputs now, not the cache's
        from simpletuner.train.text_encoders import encode_in_step

        text, empty_text = encode_in_step(run.family, run.components, captions)
    text, batch = run.family.drop_captions(run.components, text, empty_text, keep, raw)
    batch["latents"], batch["text"] = latents, text
    batch = run.family.draw_conditioning(run.components, batch, generator)
    draw = run.objective.draw(latents, generator)
    return training_loss(run.family, run.components, run.objective, batch, draw, run.trained.base_model,
                         prior_loss_weight=run.cfg.prior_loss_weight)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _feed(run: Run, start: int) -> Any:
    """The run's micro-batches from step `start`, built ahead in a thread when dataloader_prefetch is on."""
    from simpletuner.train.prefetch import BatchFeed

    cfg, rank = run.cfg, run.accelerator.process_index
    return BatchFeed(run.sampler, lambda refs, rng, refill: run.data.batch(refs, run.family, run.components, rng,
                                                                           refill=refill),
                     lambda step, micro: _micro_seed(cfg.seed, step, micro, rank), start=start,
                     total_steps=run.total_steps, accumulation=cfg.gradient_accumulation_steps,
                     depth=cfg.dataloader_prefetch_qlen if cfg.dataloader_prefetch else 0,
                     pin=run.device.type == "cuda", device=run.device)


def _micro_seed(seed: int | None, step: int, micro: int, rank: int) -> int:
    return hash((seed or 0, step, micro, rank)) & 0x7FFF_FFFF_FFFF


def _clip(run: Run) -> torch.Tensor:
    """Clip as configured; returns the gradient norm (before clipping by norm) as a device tensor."""
    parameters = run.trained.parameters()
    if run.cfg.max_grad_norm > 0 and run.cfg.grad_clip_method == "norm":
        norm = run.accelerator.clip_grad_norm_(parameters, run.cfg.max_grad_norm)
        return _whole(norm.detach()) if isinstance(norm, torch.Tensor) else torch.tensor(float(norm or 0.0))
    if run.cfg.max_grad_norm > 0:
        run.accelerator.clip_grad_value_(parameters, run.cfg.max_grad_norm)
    grads = [_whole(p.grad.detach().float().norm()) for p in parameters if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros((), device=run.device)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a sharded (DTensor) value: FSDP2's norms are reduced over the processes."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ------------------------------------------------------------------ logging
@dataclass
class _Window:
    """What happened since the last logging step (device tensors until read)."""

    steps: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    skipped: list[torch.Tensor] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    wait: float = 0.0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    summary: dict[str, float] = field(default_factory=dict)  # the last logging step's figures, for events

    def add(self, step: int, update: _Update, samples: int) -> None:
        self.steps.append(step)
        self.losses.append(update.loss)
        self.grad_norms.append(update.grad_norm.to(update.loss.device).float())
        self.skipped.append(update.skipped)
        self.learning_rates.append(update.learning_rate)
        self.wait += update.wait
        self.samples += samples

    def reset(self) -> None:
        self.steps, self.losses, self.grad_norms, self.skipped, self.learning_rates = [], [], [], [], []
        self.wait, self.samples, self.started = 0.0, 0, time.perf_counter()


def _log(run: Run, window: _Window, bar: Any) -> dict[int, float]:
    """Read the window's values (the only host synchronisation), log them, and reset the window."""
    losses = run.accelerator.reduce(torch.stack(window.losses), reduction="mean").tolist()
    norms = torch.stack(window.grad_norms).tolist()
    skipped = torch.stack(window.skipped).tolist()
    rates = window.learning_rates
    seconds = time.perf_counter() - window.started
    samples_per_second = window.samples * run.accelerator.num_processes / max(seconds, 1e-9)
    if run.accelerator.is_main_process:
        from simpletuner.train.trackers import training_scalars

        for step, loss, norm, rate in zip(window.steps, losses, norms, rates):
            last = step == window.steps[-1]
            run.tracker.log_scalars(training_scalars(
                loss=loss, learning_rate=rate, grad_norm=norm,
                samples_per_second=samples_per_second if last else None,
                data_wait_seconds=window.wait if last else None), step)
        _append_metrics(run, window.steps, losses, norms, rates, skipped)
        postfix = {"loss": f"{losses[-1]:.4f}", "lr": f"{rates[-1]:.2e}"}
        if any(skipped):
            postfix["skipped"] = f"{sum(skipped)} non-finite"
        bar.set_postfix(postfix, refresh=False)
    loop_logger.debug("steps %s: %.2f samples/s, %.3f s waiting for data", window.steps, samples_per_second,
                      window.wait)
    logged = dict(zip(window.steps, losses))
    window.summary = {"loss": losses[-1], "lr": rates[-1], "grad_norm": norms[-1],
                      "samples_per_second": samples_per_second, "data_wait_seconds": window.wait}
    window.reset()
    return logged


def _append_metrics(run: Run, steps: list[int], losses: list[float], norms: list[float], rates: list[float],
                    skipped: list[bool]) -> None:
    """One row per step: its loss, grad norm, the learning rate its update used, and whether it was skipped
    (strict JSON: a nan or inf loss or grad norm is written as null)."""
    path = Path(run.cfg.output_dir) / "metrics.jsonl"
    with path.open("a") as handle:
        for step, loss, norm, lr, skip in zip(steps, losses, norms, rates, skipped):
            row = {"step": step, "loss": _finite(loss), "grad_norm": _finite(norm), "lr": lr}
            if skip:
                row["skipped"] = True  # not finite: the optimiser did not step
            handle.write(json.dumps(row) + "\n")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------ checkpoints, validation, export
def _checkpoint_parts(run: Run, loading: Path | None = None) -> dict[str, Any]:
    states: dict[str, Any] = {"optimizer": run.optimizer, "lr_scheduler": run.lr_scheduler}
    if run.ema is not None:
        states["ema"] = run.ema
    return run.sharding.checkpoint_parts({"trained": run.trained.module, **run.trained.text_encoders}, states,
                                         {"sampler": run.feed if run.feed is not None else run.sampler}, loading)


def _save_checkpoint(run: Run, step: int) -> Path:
    from simpletuner.publish.export import checkpoint_lora_writer
    from simpletuner.train.checkpoint import Progress, save_checkpoint

    return save_checkpoint(run.cfg.output_dir, Progress(step=step, epoch=run.feed.epoch),
                           config=run.cfg.model_dump(mode="json"), identity=run.identity,
                           processes=run.processes, total_limit=run.cfg.checkpoints_total_limit,
                           write_extra=checkpoint_lora_writer(run, step), **_checkpoint_parts(run))


def _resume(run: Run) -> int:
    from simpletuner.train.checkpoint import load_checkpoint

    if run.resume_from is None:
        return 0
    progress = load_checkpoint(run.resume_from, identity=run.identity, processes=run.processes,
                               **_checkpoint_parts(run, run.resume_from))
    logger.info("resumed from %s at step %d", run.resume_from, progress.step)
    return progress.step


def _validate(run: Run, step: int) -> list[Path]:
    from simpletuner.train.optim import set_train_mode
    from simpletuner.validate import run_validation

    images: list[Path] = []
    with run.sharding.for_validation(run.components, run.trained, run.device) as components:  # every process
        if run.accelerator.is_main_process:
            modules = [run.family.denoiser(components), *run.trained.text_encoders.values()]
            set_train_mode(run.optimizer, False)
            for module in modules:
                module.eval()
            try:
                with run.parked.on_device() if run.parked else contextlib.nullcontext():
                    controls = _controls(run)
                    images = run_validation(run.validation, run.family, components, run.cfg, step, run.tracker,
                                            None if controls else _init_images(run), controls)
            finally:
                for module in modules:
                    module.train()
                set_train_mode(run.optimizer, True)
    run.accelerator.wait_for_everyone()
    return images


def _controls(run: Run) -> list[Any] | None:
    """The control images ControlNet validation samples from (validation_conditioning_images, num_eval_images);
    None: one control image of each validation size (_init_images)."""
    if run.validation is None or not (run.validation.controls or run.validation.eval_images):
        return None
    if run.validation.controls:
        return list(run.validation.controls)
    from simpletuner.train.conditioning import eval_controls
    from simpletuner.validate import control_input

    return [control_input(*control) for control in eval_controls(run.data.datasets, run.validation.eval_images)]


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
    from simpletuner.train.writes import explained_write_errors

    outputs: list[Path] = []
    if run.ema is not None:  # every process: the averaged weights (of its shard, when sharded) are exported
        run.ema.copy_to()
    with run.sharding.whole(run.components, run.trained) as (components, trained):  # every process gathers
        if run.accelerator.is_main_process:
            _check_finite(trained.parameters(), run.cfg.output_dir)
            output_dir = Path(run.cfg.output_dir)
            with explained_write_errors(f"export the model into {output_dir}", output_dir,
                                        "the final checkpoint is complete: free space, then run again with "
                                        "--resume_from_checkpoint latest to export"):
                outputs = export_model(run.family, components, trained, run.cfg, run.ema, run_metadata(run, step))
    run.accelerator.wait_for_everyone()
    return outputs


def _check_finite(parameters: list[torch.Tensor], output_dir: str) -> None:
    """Never export nan or inf weights (one host read, once per run)."""
    from simpletuner.errors import UserError

    finite = torch.stack([p.detach().isfinite().all() for p in parameters]).all()
    if not bool(finite):
        raise UserError(f"the trained weights hold nan or inf values: nothing was exported to {output_dir}; "
                        "lower learning_rate and train again from an earlier checkpoint")
