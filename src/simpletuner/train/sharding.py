"""How the trained module is spread over the processes: replicated (plain), FSDP2 or DeepSpeed ZeRO.

One object, chosen once when the run is built, is the trainer's only seam: it prepares the module and
optimiser with accelerate, averages gradients (or leaves that to the wrapped model), saves and loads the
trained weights and optimiser state of checkpoints, and hands the export whole weights. The trainer
calls the same methods whichever is used.

- Plain: the module is never wrapped; gradients are averaged in buckets, all-reduced while the backward of
  an update's last micro-batch runs (train/overlap.py);
  checkpoints hold the trainable tensors and the optimiser state as written by the first process.
- FSDP2 (`fsdp_enable`): accelerate's FullyShardedDataParallelPlugin(fsdp_version=2) shards the module
  in place (`fully_shard`), gradients are reduce-scattered in backward. Checkpoints go through
  torch.distributed.checkpoint's state-dict API: each process's shard (SHARDED_STATE_DICT, a `fsdp/`
  folder of torch.distributed.checkpoint) or the full weights and optimiser state gathered to the first
  process (FULL_STATE_DICT, `trained.safetensors` and `optimizer.pt`). Either loads at any number of
  processes, and into an unsharded run (train/reshard.py).
- DeepSpeed (`deepspeed_config`): accelerate's DeepSpeedPlugin; the engine reduces gradients and steps;
  checkpoints are the engine's own (`deepspeed/` folder, every process writes its partition).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.train.reshard import SHARDED_FOLDER

if TYPE_CHECKING:
    from accelerate import Accelerator

    from simpletuner.models.base import Components
    from simpletuner.train.adapters import Trained

logger = get_logger(__name__)

DEEPSPEED_TAG = "deepspeed"
EMA_STATE = "ema"  # the checkpoint's ema.pt, as save_checkpoint names its states


# ------------------------------------------------------------------ accelerator plugins
def accelerator_plugins(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for Accelerator(...): the FSDP2 or DeepSpeed plugin the configuration asks for."""
    if cfg.fsdp_enable:
        return {"fsdp_plugin": fsdp_plugin(cfg)}
    if cfg.deepspeed_config:
        return {"deepspeed_plugin": deepspeed_plugin(cfg)}
    _warn_unused_fsdp_options(cfg)
    return {}


def fsdp_plugin(cfg: Any) -> Any:
    from accelerate.utils import FullyShardedDataParallelPlugin

    classes = [name.strip() for name in (cfg.fsdp_transformer_layer_cls_to_wrap or "").split(",") if name.strip()]
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=cfg.fsdp_reshard_after_forward,
        state_dict_type=cfg.fsdp_state_dict_type, cpu_ram_efficient_loading=cfg.fsdp_cpu_ram_efficient_loading,
        auto_wrap_policy=cfg.fsdp_auto_wrap_policy.lower(), transformer_cls_names_to_wrap=classes or None)


def deepspeed_settings(cfg: Any) -> dict[str, Any]:
    """The DeepSpeed config with the values this run decides (batch size, accumulation, clipping) filled in."""
    from simpletuner.config.sharding import read_deepspeed_config

    config = read_deepspeed_config(cfg.deepspeed_config)
    config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    config["gradient_clipping"] = cfg.max_grad_norm if cfg.grad_clip_method == "norm" else 0.0
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the process count
    config.setdefault("zero_allow_untested_optimizer", True)  # the optimiser is ours (build_optimizer)
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # and stays ours when its state is offloaded
    return config


def deepspeed_plugin(cfg: Any) -> Any:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("deepspeed_config needs DeepSpeed, which is not installed: "
                        "pip install 'simpletuner[deepspeed]'")
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=deepspeed_settings(cfg))


def _warn_unused_fsdp_options(cfg: Any) -> None:
    from simpletuner.config.sharding import FSDP_OPTIONS

    fields = type(cfg).model_fields
    unused = [name for name in FSDP_OPTIONS if getattr(cfg, name) != fields[name].default]
    if unused:
        logger.warning("%s set without fsdp_enable: ignored (training is not sharded)", ", ".join(unused))


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin: Any) -> None:
    """accelerate turns FSDP on only for accelerator processes; FSDP2 itself runs on CPU processes over gloo,
    so select it there too (2+ CPU processes, e.g. `accelerate launch --multi_gpu` without a GPU)."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin


def select_deepspeed(accelerator: Accelerator, plugin: Any) -> None:
    """Make DeepSpeed the accelerator's distributed type, on CPU processes too, and keep the frozen models whole.

    accelerate turns DeepSpeed on only for accelerator processes; ZeRO runs on CPU processes as well (gloo,
    DeepSpeed's CPU accelerator), so it is selected there too: one process, or several launched with
    `accelerate launch --multi_gpu` (or torchrun) without a GPU. DeepSpeed casts for mixed precision itself.
    Selecting the plugin also tells transformers that ZeRO-3 is on, which would build every transformers model
    loaded afterwards (the frozen text encoders) partitioned under `deepspeed.zero.Init`, outside any engine:
    that notice is withdrawn, and the engine partitions the trained module when accelerate prepares it."""
    from accelerate.utils import DistributedType
    from transformers.integrations import unset_hf_deepspeed_config

    state = accelerator.state
    if state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        import torch.distributed as dist

        if not dist.is_initialized():  # one process: DeepSpeed wants a process group (of one) all the same
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # which DeepSpeed reads instead of asking the group
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = DistributedType.DEEPSPEED
        state._mixed_precision = "no"
    unset_hf_deepspeed_config()


def sharding_for(accelerator: Accelerator, cfg: Any) -> "Sharding":
    """The sharding the accelerator ended up with; refuses sharding options it could not honour."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return FSDP2(state_dict_type=cfg.fsdp_state_dict_type, ram_efficient=cfg.fsdp_cpu_ram_efficient_loading)
    if kind == DistributedType.DEEPSPEED:
        from simpletuner.config.sharding import zero_stage

        return DeepSpeed(stage=zero_stage(accelerator.state.deepspeed_plugin.deepspeed_config))
    if cfg.fsdp_enable:
        logger.warning("fsdp_enable with %d process: nothing to shard over, training unsharded",
                       accelerator.num_processes)
    return Plain()


# ------------------------------------------------------------------ the seam
@dataclass
class Sharding:
    """Plain replicated training; the sharded kinds below override what differs."""

    sharded = False
    validates = True  # the first process alone can run a validation pipeline on the trained module
    module: nn.Module | None = None
    optimizer: Any = None

    def prepare(self, accelerator: Accelerator, module: nn.Module, optimizer: Any) -> Any:
        """Wrap what accelerate wraps; returns the optimiser to step."""
        self.module = module
        self.optimizer = accelerator.prepare_optimizer(optimizer)
        return self.optimizer

    def before_backward(self, parameters: list[nn.Parameter], world: int, last: bool) -> None:
        """Called before each micro-batch's backward; `last`: the update's last one (its gradients are final)."""

    def backward(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, already divided by the number of micro-batches of the update."""
        accelerator.backward(loss)

    def reduce_gradients(self, parameters: list[nn.Parameter], world: int) -> None:
        """Average gradients over processes (one flat all-reduce; the module itself is never wrapped)."""
        if world == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in parameters if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    def checkpoint_parts(self, modules: Mapping[str, nn.Module], states: Mapping[str, Any],
                         rank_states: Mapping[str, Any], loading: Path | None = None) -> dict[str, Any]:
        """save_checkpoint/load_checkpoint arguments (`loading`: the checkpoint to be read, None when saving); the
        sharded kinds take the module and optimiser over. A checkpoint FSDP2 wrote (sharded, or whole with the
        optimiser keyed by name) is read whole through train/reshard.py: elastic resume of an FSDP2 run on one
        process, or with fsdp_enable off."""
        from simpletuner.train.reshard import Reader, written_by_fsdp

        if loading is not None and written_by_fsdp(loading):
            return {"modules": {name: m for name, m in modules.items() if name != "trained"},
                    "states": _without_optimizer(states), "rank_states": dict(rank_states),
                    "collective": Reader(modules["trained"], states["optimizer"])}
        return {"modules": dict(modules), "states": dict(states), "rank_states": dict(rank_states)}

    @contextmanager
    def whole(self, components: Components, trained: Trained) -> Iterator[tuple[Components, Trained]]:
        """Components and trained module with whole weights, for the export (every process enters)."""
        yield components, trained

    @contextmanager
    def for_validation(self, components: Components, trained: Trained, device: torch.device) -> Iterator[Components]:
        """Components whose trained module holds whole weights on `device`, for the first process's validation
        pipeline (every process enters)."""
        yield components


@dataclass
class Plain(Sharding):
    """Replicated weights; several processes average gradients in buckets during backward (train/overlap.py)."""

    reducer: Any = None

    def before_backward(self, parameters: list[nn.Parameter], world: int, last: bool) -> None:
        if world == 1:
            return
        if self.reducer is None:
            from simpletuner.train.overlap import OverlappedReducer

            self.reducer = OverlappedReducer(parameters, world)
        self.reducer.syncing = last

    def reduce_gradients(self, parameters: list[nn.Parameter], world: int) -> None:
        if self.reducer is None:
            return super().reduce_gradients(parameters, world)
        self.reducer.finish()


def _without_optimizer(states: Mapping[str, Any]) -> dict[str, Any]:
    return {name: state for name, state in states.items() if name != "optimizer"}


@dataclass
class FSDP2(Sharding):
    state_dict_type: str = "SHARDED_STATE_DICT"
    ram_efficient: bool = False
    ema: Any = None  # the run's EMA (of each process's shard), saved whole with the checkpoint
    sharded = True

    def prepare(self, accelerator: Accelerator, module: nn.Module, optimizer: Any) -> Any:
        prepared, self.optimizer = accelerator.prepare(module, optimizer)
        if prepared is not module:  # FSDP2 shards in place; the family's components keep calling `module`
            raise RuntimeError("accelerate returned a wrapper instead of sharding the module in place")
        self.module = module
        return self.optimizer

    def reduce_gradients(self, parameters: list[nn.Parameter], world: int) -> None:
        return None  # reduce-scattered by FSDP in backward

    def checkpoint_parts(self, modules: Mapping[str, nn.Module], states: Mapping[str, Any],
                         rank_states: Mapping[str, Any], loading: Path | None = None) -> dict[str, Any]:
        shared = _without_optimizer(states)
        self.ema = shared.pop("ema", None)
        return {"modules": {}, "states": shared, "rank_states": dict(rank_states),
                "collective": self}  # save/load below, on every process

    def _options(self, full: bool, **extra: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=full, cpu_offload=full, **extra)

    def save(self, folder: Path, is_main: bool) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        full = self.state_dict_type == "FULL_STATE_DICT"
        model = get_model_state_dict(self.module, options=self._options(full))
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=self._options(full))
        if not full:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model, "optimizer": optim}, checkpoint_id=str(folder / SHARDED_FOLDER))
        elif is_main:
            from safetensors.torch import save_file

            trainable = {name for name, p in self.module.named_parameters() if p.requires_grad}
            save_file({k: v.contiguous() for k, v in model.items() if k in trainable},
                      str(folder / "trained.safetensors"))
            torch.save(optim, folder / "optimizer.pt")
        if self.ema is not None:  # whole, as an unsharded run saves it: every process sends its shard
            state = self.ema.state_dict()
            state["shadow"] = [_gathered(shard, param) for shard, param in zip(state["shadow"], self.ema.parameters)]
            if is_main:
                torch.save(state, folder / f"{EMA_STATE}.pt")

    def load(self, folder: Path, is_main: bool) -> None:
        """Read the checkpoint in whichever layout it has (train/reshard.py): a sharded `fsdp/` folder reshards to
        this run's processes; whole files (this FULL_STATE_DICT, or an unsharded run's) are sharded on load. The
        EMA is whole in the checkpoint; each process takes its shard."""
        from simpletuner.train.reshard import load_either

        broadcast = self.ram_efficient  # whole files: the first process reads, the others receive
        load_either(folder, self.module, self.optimizer, read=is_main or not broadcast, broadcast=broadcast)
        if self.ema is not None:
            _require(folder / f"{EMA_STATE}.pt", "use_ema")
            state = torch.load(folder / f"{EMA_STATE}.pt", map_location="cpu", weights_only=True)
            state["shadow"] = [_shard_of(whole, param) for whole, param in zip(state["shadow"], self.ema.parameters)]
            self.ema.load_state_dict(state)

    @contextmanager
    def whole(self, components: Components, trained: Trained) -> Iterator[tuple[Components, Trained]]:
        """Gather the full weights (every process) into an unsharded copy of the module (first process)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        full = get_model_state_dict(self.module, options=self._options(True))
        if not full:  # not the first process: its copy is not needed
            yield components, trained
            return
        plain_class = next(c for c in type(self.module).__bases__ if not issubclass(c, FSDPModule))
        copy = plain_class.from_config(self.module.config)
        copy.load_state_dict(full, strict=True, assign=True)
        name = next(key for key, value in components.modules.items() if value is self.module)
        yield (replace(components, modules={**components.modules, name: copy}),
               replace(trained, model=copy, module=copy))

    @contextmanager
    def for_validation(self, components: Components, trained: Trained, device: torch.device) -> Iterator[Components]:
        """The whole weights gathered into an unsharded copy on the first process's device: validation there
        holds the full trained module beside its shard for as long as it samples."""
        with self.whole(components, trained) as (gathered, copy):
            if copy.module is not trained.module:
                copy.module.to(device).eval()
            yield gathered


@dataclass
class DeepSpeed(Sharding):
    stage: int = 2
    sharded = True
    engine: Any = None
    last: bool = True  # the micro-batch whose backward comes next is the update's last

    @property
    def validates(self) -> bool:  # ZeRO-1/2 keep whole weights on every process
        return self.stage < 3

    def prepare(self, accelerator: Accelerator, module: nn.Module, optimizer: Any) -> Any:
        self.engine, self.optimizer = accelerator.prepare(module, optimizer)
        self.module = module  # the engine's hooks sit on the module's parameters; calls go to it directly
        return self.optimizer

    def before_backward(self, parameters: list[nn.Parameter], world: int, last: bool) -> None:
        self.last = last

    def backward(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        """The engine accumulates the micro-batches' gradients, reduces them at the update's last one and steps
        there (with its own clipping). The loss comes divided by the number of micro-batches already, so the
        engine does not divide it again."""
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=self.last, scale_wrt_gas=False)

    def reduce_gradients(self, parameters: list[nn.Parameter], world: int) -> None:
        return None  # the engine reduced (and stepped) in the last micro-batch's backward

    def checkpoint_parts(self, modules: Mapping[str, nn.Module], states: Mapping[str, Any],
                         rank_states: Mapping[str, Any], loading: Path | None = None) -> dict[str, Any]:
        shared, per_rank = _without_optimizer(states), dict(rank_states)
        if self.stage == 3 and "ema" in shared:  # each process averages its partition: saved with its rank
            per_rank["ema"] = shared.pop("ema")
        return {"modules": {}, "states": shared, "rank_states": per_rank,
                "collective": self}  # save/load below, on every process

    def save(self, folder: Path, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder: Path, is_main: bool) -> None:
        _require(folder / DEEPSPEED_TAG, "deepspeed_config")
        self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    @contextmanager
    def whole(self, components: Components, trained: Trained) -> Iterator[tuple[Components, Trained]]:
        context = nullcontext()
        if self.stage == 3:  # ZeRO-3 partitions the weights: gather them for the export
            import deepspeed

            context = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        with context:
            if self.stage == 3:
                _regather_persistent(self.module.parameters())
            yield components, trained


def _regather_persistent(parameters: Iterable[nn.Parameter]) -> None:
    """ZeRO-3 keeps small weights whole on every process (`ds_persist`) beside their partitions, and gathering
    leaves them as they are: rebuild them from their partitions, which the optimiser and the EMA's `copy_to`
    write (collective: every process calls it)."""
    import torch.distributed as dist

    for param in parameters:
        if not getattr(param, "ds_persist", False):
            continue
        parts = [torch.empty_like(param.ds_tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, param.ds_tensor.contiguous())
        with torch.no_grad():
            param.data.copy_(torch.cat(parts)[:param.ds_numel].view(param.ds_shape))


def _gathered(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `shard` is this process's part, laid out as the sharded `param` (collective)."""
    if not hasattr(param, "device_mesh"):
        return shard
    from torch.distributed.tensor import DTensor

    sharded = DTensor.from_local(shard.to(param.device), param.device_mesh, param.placements, shape=param.shape,
                                 stride=param.stride())
    return sharded.full_tensor().cpu()


def _shard_of(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's part of `whole`, laid out as the sharded `param` (each process slices its own copy)."""
    if not hasattr(param, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


def _require(path: Path, option: str) -> None:
    if not path.exists():
        raise UserError(f"checkpoint {path.parent} has no {path.name}: it was not saved with {option} as this run "
                        "is; resume with the settings it was saved with")

