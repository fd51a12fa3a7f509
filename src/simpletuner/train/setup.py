"""Everything a run needs, built once, in an order that fails fast.

Checks that need no model (output directory, resume compatibility, validation
settings) run before anything long; then the model loads, the datasets are
scanned and cached, and the trainable part, optimiser, schedule, sampler, EMA
and tracker are built. The trainer never branches on a family's name.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.train.sharding import Plain, Sharding

if TYPE_CHECKING:
    from accelerate import Accelerator

    from simpletuner.config.load import Settings
    from simpletuner.data.sampler import MultiDatasetSampler
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.adapters import Trained
    from simpletuner.train.checkpoint import Processes
    from simpletuner.train.data import TrainingData
    from simpletuner.train.ema import EMA
    from simpletuner.train.offload import Parked
    from simpletuner.train.trackers import Tracker
    from simpletuner.validate import ValidationPlan

logger = get_logger(__name__)


@dataclass
class Run:
    """The live objects of one training run."""

    settings: Settings
    accelerator: Accelerator
    processes: Processes
    family: ModelFamily
    components: Components
    data: TrainingData
    trained: Trained
    optimizer: Any
    lr_scheduler: Any
    sampler: MultiDatasetSampler
    objective: Any
    ema: EMA | None
    tracker: Tracker
    validation: ValidationPlan | None
    identity: dict[str, Any]
    total_steps: int
    resume_from: Path | None
    sharding: Sharding = field(default_factory=Plain)  # replicated, FSDP2 or DeepSpeed: train/sharding.py
    init_images: dict[tuple[int, int], Any] | None = None  # training images for img2img validation
    parked: Parked | None = None  # frozen encoders waiting on the CPU while the step runs
    levers: Any = None  # compile, channels_last, the SDPA kernel (train/levers.py)
    feed: Any = None  # the micro-batches being trained on (train/prefetch.py), from the first step on

    @property
    def cfg(self):
        return self.settings.training

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


SKIPPED_REPORT = "skipped.jsonl"  # in output_dir: every image this run left out, with its reason


def check_output_dir(output_dir: str) -> Path:
    """Create output_dir if needed and prove it writable, before any long work."""
    path = Path(output_dir)
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output_dir {output_dir!r} is not writable ({error.strerror or error}); "
                        "choose a folder you can write to") from error
    return path


def make_accelerator(settings: Settings) -> Accelerator:
    from accelerate import Accelerator

    from simpletuner.train.sharding import accelerator_plugins, enable_fsdp_on_cpu, select_deepspeed

    cfg = settings.training
    plugins = accelerator_plugins(cfg)  # FSDP2 or DeepSpeed, when asked for
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=1, **plugins)  # the trainer counts accumulation
    if "fsdp_plugin" in plugins:
        enable_fsdp_on_cpu(accelerator, plugins["fsdp_plugin"])
    if "deepspeed_plugin" in plugins:
        select_deepspeed(accelerator, plugins["deepspeed_plugin"])
    return accelerator


def build_run(settings: Settings, accelerator: Accelerator) -> Run:
    """Build a run; raises UserError for bad input before the long work starts."""
    from simpletuner.config.packages import check_packages
    from simpletuner.config.unimplemented import check_implemented
    from simpletuner.models.registry import get_family, with_checkpoint
    from simpletuner.train.adapters import check_regularisation
    from simpletuner.train.quantize import check_quantisation, quantize_components
    from simpletuner.train.checkpoint import Processes, check_compatible, resolve_resume, run_identity
    from simpletuner.train.sharding import sharding_for
    from simpletuner.validate import validation_plan

    settings = with_checkpoint(settings)  # model_flavour (or the family's default) names the checkpoint
    generators = settings
    if any(dataset.conditioning for dataset in settings.datasets):  # conditioning: [{type: canny}]
        from simpletuner.data.generators import with_generated_conditioning

        settings = with_generated_conditioning(settings)
    cfg = settings.training
    check_implemented(cfg, settings.datasets)
    check_packages(cfg, settings.datasets)
    check_regularisation(cfg, settings.datasets)
    sharding = sharding_for(accelerator, cfg)
    check_quantisation(cfg, accelerator.device)
    check_output_dir(cfg.output_dir)
    family = get_family(cfg.model_family)
    if cfg.controlnet:
        from simpletuner.models.controlnet import check_controlnet_family

        check_controlnet_family(family, cfg)
    validation = validation_plan(cfg, family)
    identity = run_identity(cfg, settings.datasets)
    resume_from = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    resumed_at = 0
    if resume_from is not None:
        meta = check_compatible(resume_from, identity, accelerator.num_processes, accelerator.is_main_process)
        resumed_at = meta["step"]
        settings = _keep_global_batch(settings, resume_from, meta, accelerator.num_processes)
        cfg = settings.training
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
    components = family.load(cfg)
    if cfg.controlnet:  # from the base's full-precision weights, before the frozen base is quantised
        from simpletuner.models.controlnet import attach_controlnet

        attach_controlnet(family, components, cfg)
    quantize_components(family, components, cfg, accelerator.device)  # frozen weights, before any adapter
    components.to(accelerator.device)
    _configure_vae(components, cfg)
    if generators is not settings:
        from simpletuner.data.generators import generate_all

        if accelerator.is_main_process:
            print("\n".join(generate_all(settings, generators)), flush=True)
        accelerator.wait_for_everyone()
    data = prepare_data(settings, family, components, accelerator, on_demand=cfg.vae_cache_ondemand,
                        report_path=str(Path(cfg.output_dir) / SKIPPED_REPORT))
    from simpletuner.train.offload import park_encoders

    parked = park_encoders(components, data, accelerator.device, cfg)  # the caches are complete
    run = _training_parts(settings, accelerator, family, components, data, validation, identity, resume_from,
                          Processes.from_accelerator(accelerator), resumed_at, sharding)
    run.parked = parked
    return run


def _configure_vae(components: Components, cfg: Any) -> None:
    vae = components.get("vae")
    if vae is not None and cfg.vae_enable_tiling:
        vae.enable_tiling()
    if vae is not None and cfg.vae_enable_slicing:
        vae.enable_slicing()


def scaled_learning_rate(cfg: Any, processes: int) -> float:
    """lr_scale: learning_rate x (processes x batch size x accumulation), or its square root with lr_scale_sqrt."""
    if not cfg.lr_scale:
        return cfg.learning_rate
    factor = processes * cfg.train_batch_size * cfg.gradient_accumulation_steps
    return cfg.learning_rate * (factor ** 0.5 if cfg.lr_scale_sqrt else factor)


def prepare_data(settings: Settings, family: ModelFamily, components: Components, accelerator: Accelerator,
                 on_demand: bool = False, report_path: str | None = None) -> TrainingData:
    """Scan the datasets (printing the report) and encode what the caches lack (printing summaries);
    with `on_demand`, latents are left to be encoded when a batch first needs them. Images left out
    (the index's skips, unreadable captions, failed loads or encodes) are listed in `report_path`
    (JSON lines), when given."""
    from simpletuner.train.data import TrainingData

    data = TrainingData.prepare(settings, family, components)
    if accelerator.is_main_process:
        print(data.scan_report, end="", flush=True)
    if report_path is not None:  # the main process starts it; every rank appends what fails in training
        data.open_report(report_path, start=accelerator.is_main_process)
    for summary in data.ensure_cached(family, components, vae_batch_size=settings.training.vae_batch_size,
                                      progress=accelerator.is_main_process,
                                      on_demand=on_demand):
        if accelerator.is_main_process:
            print(summary, flush=True)
    return data


def _training_parts(settings: Settings, accelerator: Accelerator, family: ModelFamily, components: Components,
                    data: TrainingData, validation: ValidationPlan | None, identity: dict[str, Any],
                    resume_from: Path | None, processes: Processes, resumed_at: int = 0,
                    sharding: Sharding | None = None) -> Run:
    from simpletuner.data.sampler import MultiDatasetSampler, SamplerDataset
    from simpletuner.train.ema import EMA
    from simpletuner.train.optim import build_optimizer
    from simpletuner.train.schedules import build_lr_scheduler
    from simpletuner.train.trackers import open_tracker

    cfg = settings.training
    if cfg.lr_scale:
        cfg = cfg.model_copy(update={"learning_rate": scaled_learning_rate(cfg, accelerator.num_processes)})
    trained, levers = prepare_model(cfg, family, components, accelerator.device)
    sampler = MultiDatasetSampler.from_config(
        cfg, [SamplerDataset.from_config(d, data.datasets[d.id].assignment) for d in settings.datasets
              if d.id in data.datasets],
        rank=accelerator.process_index, world_size=accelerator.num_processes)
    total_steps = _total_steps(cfg, sampler.steps_in_epoch)
    text_parameters = [p for encoder in trained.text_encoders.values() for p in encoder.parameters()]
    sharding = sharding or Plain()
    optimizer = sharding.prepare(accelerator, trained.module,
                                 build_optimizer(trained.parameters(), cfg, accelerator.device.type,
                                                 text_encoder_params=text_parameters))
    if sharding.sharded and validation is not None and not sharding.validates:
        logger.warning("validation is skipped: its pipeline runs on the first process, and %s weights are "
                       "sharded over all of them", type(sharding).__name__)
        validation = None
    lr_scheduler = build_lr_scheduler(optimizer, cfg, total_steps)
    ema = None
    if cfg.use_ema:
        ema = EMA(trained.parameters(), cfg.ema_decay, update_every=cfg.ema_update_interval or 1,
                  device="cpu" if cfg.ema_device == "cpu" else None)
    tracker = open_tracker(cfg, is_main_process=accelerator.is_main_process,
                           run_config=cfg.model_dump(mode="json", exclude={"webhook_config"}),  # URLs: secrets
                           resumed_at=resumed_at)
    objective = family.objective(cfg, components).to(accelerator.device)
    return Run(settings, accelerator, processes, family, components, data, trained, optimizer, lr_scheduler,
               sampler, objective, ema, tracker, validation, identity, total_steps, resume_from, sharding=sharding,
               levers=levers)


def prepare_model(cfg: Any, family: ModelFamily, components: Components, device: torch.device) -> tuple[Trained, Any]:
    """What trains (full, LoRA, LyCORIS; a ControlNet; text encoders), fused, checkpointed and with the speed levers
    applied, on `device`; returns it and the levers (train/levers.py). The trainer and benchmarks/train_step.py
    both build the step's model with this."""
    from simpletuner.config.schema import trains_adapter
    from simpletuner.train.adapters import DEFAULT_LYCORIS_TARGETS, prepare_trainable
    from simpletuner.train.levers import apply_levers, resolve_levers
    from simpletuner.train.optim import trained_weight_dtype
    from simpletuner.train.text_encoders import prepare_text_encoders

    denoiser = family.denoiser(components)
    trains, prefix, targets = denoiser, family.denoiser_name(), family.adapter_targets(cfg)
    if cfg.controlnet:  # the ControlNet trains (full or with an adapter); the denoiser stays frozen
        from simpletuner.models.controlnet import CONTROLNET, attach_controlnet, controlnet_lora_targets

        trains, prefix = attach_controlnet(family, components, cfg), CONTROLNET
        targets = controlnet_lora_targets(trains, targets)
    fused_first = cfg.fuse_qkv_projections and trains_adapter(cfg)  # the LoRA goes on the fused layers
    excluded: list[str] = []
    if fused_first:
        from simpletuner.train.fusion import fuse_qkv, fused_adapter_targets

        logger.info("fused the attention projections of %d layers", fuse_qkv(denoiser))
        targets, excluded = fused_adapter_targets(denoiser, targets)
    trained = prepare_trainable(trains, cfg, targets, prefix=prefix,
                                lycoris_targets=getattr(family, "lycoris_targets", DEFAULT_LYCORIS_TARGETS),
                                exclude_modules=excluded)
    trained.text_encoders = prepare_text_encoders(family, components, cfg)
    trained.module.to(device)
    if trained_weight_dtype(cfg) is not None:  # adamw_bf16 trains bf16 weights
        trained.cast_trainable(trained_weight_dtype(cfg))
    if cfg.fuse_qkv_projections and not fused_first:  # full training: fused after the weights are made trainable
        from simpletuner.train.fusion import fuse_qkv

        logger.info("fused the attention projections of %d layers", fuse_qkv(denoiser))
    swapped: Collection[nn.Module] = ()
    if cfg.musubi_blocks_to_swap:  # after the adapter is attached and on the device, before the optimiser
        from simpletuner.train.block_swap import swap_blocks

        swapped = swap_blocks(denoiser, family.block_lists, cfg.musubi_blocks_to_swap, device)
        logger.info("block swap: %d blocks' frozen weights (%.2f GiB) wait on the CPU", len(swapped),
                    swapped.frozen_bytes / 2**30)
    if cfg.gradient_checkpointing:  # the trained model's blocks (a ControlNet's; its frozen denoiser is not)
        from simpletuner.train.checkpointing import enable_checkpointing

        enable_checkpointing(trains, cfg.gradient_checkpointing_interval, self_checkpointed=swapped)
    levers = resolve_levers(cfg, denoiser, device)
    apply_levers(denoiser, levers, skip=swapped)
    trains.train()
    return trained, levers


def _keep_global_batch(settings: Settings, resume_from: Path, meta: dict[str, Any], processes: int) -> Settings:
    """With resume_keep_global_batch, the accumulation that keeps the checkpoint's effective batch."""
    from simpletuner.train.checkpoint import resumed_accumulation

    cfg = settings.training
    accumulation = resumed_accumulation(resume_from, meta, processes, cfg.gradient_accumulation_steps,
                                        cfg.resume_keep_global_batch)
    if accumulation == cfg.gradient_accumulation_steps:
        return settings
    return replace(settings, training=cfg.model_copy(update={"gradient_accumulation_steps": accumulation}))


def _total_steps(cfg: Any, batches_per_epoch: int) -> int:
    """Optimiser updates of the run: max_train_steps, or num_train_epochs of the sampler's epochs."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    epochs = cfg.num_train_epochs or 1
    return max(1, epochs * batches_per_epoch // cfg.gradient_accumulation_steps)

