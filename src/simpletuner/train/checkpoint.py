"""Checkpoints: atomic save, rotation and exact resume.

A checkpoint is a folder `output_dir/checkpoints/step-000500/` holding

    meta.json               counters, process count and the run's identity; written last
    config.json             the whole configuration, for people
    <name>.safetensors      the trainable parameters of each trained module (adapter or full)
    <name>.pt               every shared state: optimizer, lr_scheduler, ema, ...
    rank-00000.pt, ...      each process's RNG states (python, numpy, torch CPU and CUDA) and
                            its own states (the sampler's position)
    anything `write_extra` adds (e.g. pytorch_lora_weights.safetensors, for people)

Under sharded training a `collective` part, written and read by every process, holds the trained
weights and optimiser state instead (train/sharding.py: `fsdp/` or `deepspeed/` folders, or FSDP's
gathered `trained.safetensors` and `optimizer.pt`).

It is written under `.tmp-step-000500/` and renamed once every process has written its part,
so a folder named `step-*` with a meta.json is always complete. Temporary folders left by a
crash are ignored and removed by the next save. Old checkpoints are rotated out only after a
new one is complete.

Every process must call `save_checkpoint` and `load_checkpoint` (they hold barriers). The
folder must be on storage all processes see.

Elastic resume: a checkpoint made by N processes resumes with M. Weights, optimiser, scheduler
and EMA are whole (rank 0's files) and load as they are; FSDP2's sharded `fsdp/` folder is a
torch.distributed.checkpoint, which reshards on load (train/reshard.py reads either layout into
either sharding, so an FSDP2 checkpoint also resumes on one process and an unsharded one under
FSDP2). The sampler's position comes from rank 0's state (all ranks share epoch and step) and re-deals the rest of the epoch over the M ranks; each
process restores its RNG from its own file when there is one (the trainer seeds every micro-batch
from the step, so nothing drawn depends on it). A DeepSpeed checkpoint (ZeRO partitions per process)
is refused at another size.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from simpletuner.errors import UserError
from simpletuner.log import get_logger
from simpletuner.train.writes import explained_write_errors

logger = get_logger(__name__)

FORMAT = 1
META = "meta.json"
_TEMP = ".tmp-"
_NAME = re.compile(r"^step-(\d+)$")
_DEEPSPEED_FOLDER = "deepspeed"  # train/sharding.py's DEEPSPEED_TAG: a layer above, not imported

# Options that shape what a checkpoint holds or what its sampler position means: a checkpoint
# made with other values cannot be resumed.
IDENTITY_KEYS = (
    "model_family", "model_type", "pretrained_model_name_or_path", "pretrained_unet_model_name_or_path",
    "pretrained_transformer_model_name_or_path", "controlnet", "lora_type", "lora_rank", "lora_alpha", "use_dora",
    "unet_lora_target", "flux_lora_target", "lycoris_config", "train_text_encoder", "refiner_training",
    "optimizer", "use_ema", "resolution", "resolution_type", "train_batch_size",
    "aspect_bucket_rounding",
)
# options that enter the identity only when set, so checkpoints made before they existed still resume
IDENTITY_KEYS_WHEN_SET = ("fuse_qkv_projections", "layer_freeze_strategy")
# dataset options that say where caches live, not what trains: a moved cache resumes
_WHERE_NOT_WHAT = frozenset({"cache_dir", "cache_dir_vae", "skip_file_discovery"})
_SECRET = re.compile(r"secret|access_key|token|password|webhook_config", re.IGNORECASE)  # webhook URLs are secrets


class Collective(Protocol):
    """A checkpoint part every process writes and reads (sharded weights and optimiser state)."""

    def save(self, folder: Path, is_main: bool) -> None: ...

    def load(self, folder: Path, is_main: bool) -> None: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = _no_barrier

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> "Processes":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimiser updates done and the epoch they belong to."""

    step: int
    epoch: int


# ---------------------------------------------------------------------------------- identity


def run_identity(cfg: Any, datasets: Sequence[Any] = ()) -> dict[str, Any]:
    """The options a checkpoint must share with the run resuming it (JSON values).

    `cfg` is the TrainingConfig; `datasets` the DatasetConfig entries (or plain dicts). Datasets
    enter as ids plus one hash of their settings, credentials left out.
    """
    identity = {key: _jsonable(getattr(cfg, key)) for key in IDENTITY_KEYS}
    identity.update({key: _jsonable(getattr(cfg, key)) for key in IDENTITY_KEYS_WHEN_SET
                     if getattr(cfg, key, None) not in (None, False, "none")})
    entries = [{k: v for k, v in _without_secrets(_jsonable(d)).items() if k not in _WHERE_NOT_WHAT}
               for d in datasets]
    identity["dataset_ids"] = [e.get("id") for e in entries]
    identity["datasets"] = _digest(entries)[:16]
    return identity


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def _without_secrets(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    return {k: _without_secrets(v) for k, v in entry.items() if not _SECRET.search(k)}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a run identity."""
    return _digest(dict(identity))[:16]


# ----------------------------------------------------------------------------------- finding


def checkpoints_dir(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return _NAME.match(path.name) is not None and (path / META).is_file()


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(output_dir: str | os.PathLike[str], spec: str | None) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: None, "latest" (None if there is none yet),
    a folder, or a checkpoint's name under output_dir/checkpoints."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        path = checkpoints_dir(output_dir) / spec
    if not path.is_dir():
        names = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise UserError(f"resume_from_checkpoint={spec!r}: no such checkpoint folder; "
                        f"accepted: 'latest' or a folder (in {checkpoints_dir(output_dir)}: {names})")
    if not (path / META).is_file():
        raise UserError(f"resume_from_checkpoint={spec!r}: {path} is not a complete checkpoint (no {META}); "
                        "it was probably interrupted while being written: choose another one or 'latest'")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint {path}: cannot read {META}: {error}") from error
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: format {meta.get('format')!r} is not the supported {FORMAT}")
    return meta


def check_compatible(path: Path, identity: Mapping[str, Any], world_size: int | None = None,
                     explain: bool = True) -> dict[str, Any]:
    """Raise a UserError naming every option in which `identity` differs from the checkpoint's;
    return the checkpoint's metadata. Another number of processes is accepted (logged, when
    `explain`), except for a DeepSpeed checkpoint. Cheap: reads meta.json only."""
    meta = read_meta(path)
    saved = meta["identity"]
    differences = [f"{key}: checkpoint has {saved.get(key)!r}, this run {identity.get(key)!r}"
                   for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
    if world_size is not None and meta["world_size"] != world_size:
        if (path / _DEEPSPEED_FOLDER).is_dir():
            differences.append(f"number of processes: checkpoint has {meta['world_size']}, this run {world_size} "
                               "(a DeepSpeed checkpoint holds per-process ZeRO partitions: resume it with "
                               f"{meta['world_size']} processes)")
        elif explain:
            logger.info("checkpoint %s was made by %d process(es), this run has %d: weights, optimiser and EMA "
                        "are restored (sharded ones resharded), and the rest of epoch %d is re-dealt over %d rank(s) "
                        "(no sample twice)",
                        path.name, meta["world_size"], world_size, meta["epoch"], world_size)
    if differences:
        raise UserError(f"cannot resume from {path}: it was made by a different configuration:\n  "
                        + "\n  ".join(differences)
                        + "\nRestore those settings, or train into another output_dir.")
    return meta


def resumed_accumulation(path: Path, meta: Mapping[str, Any], world_size: int, accumulation: int,
                         keep_global_batch: bool) -> int:
    """gradient_accumulation_steps for a resume: with `keep_global_batch` and another number of
    processes, the value that keeps processes x accumulation (the effective batch) of the checkpoint;
    a UserError when the new number of processes cannot keep it."""
    saved_world = int(meta["world_size"])
    if not keep_global_batch or saved_world == world_size:
        return accumulation
    saved = _saved_accumulation(path, accumulation)
    product = saved_world * saved
    if product % world_size:
        raise UserError(f"resume_keep_global_batch: checkpoint {path.name} trained with {saved_world} process(es) x "
                        f"gradient_accumulation_steps {saved} = {product} batches per update; {world_size} processes "
                        f"cannot divide {product}: use a process count that divides it, or resume without "
                        "resume_keep_global_batch")
    logger.info("resume_keep_global_batch: gradient_accumulation_steps %d -> %d (%d x %d = %d x %d batches per update)",
                saved, product // world_size, saved_world, saved, world_size, product // world_size)
    return product // world_size


def _saved_accumulation(path: Path, default: int) -> int:
    try:
        return int(json.loads((path / "config.json").read_text()).get("gradient_accumulation_steps", default))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return default


# ------------------------------------------------------------------------------------ saving


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `module` that train, by name, detached on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    progress: Progress,
    *,
    modules: Mapping[str, nn.Module],
    states: Mapping[str, Stateful],
    rank_states: Mapping[str, Stateful] | None = None,
    config: Any = None,
    identity: Mapping[str, Any] | None = None,
    processes: Processes = Processes(),
    total_limit: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
    collective: Collective | None = None,
) -> Path:
    """Write a checkpoint of `progress.step` and return its folder (on every process).

    `modules`: name -> unwrapped module whose trainable parameters are saved; `states`: name ->
    object with state_dict (optimizer, lr_scheduler, ema), saved by rank 0; `rank_states`: saved
    by every process (sampler); `write_extra(folder)` runs on rank 0 before the folder is sealed;
    `collective.save(folder, is_main)` runs on every process (sharded training's weights and optimiser).
    """
    root = checkpoints_dir(output_dir)
    name = checkpoint_name(progress.step)
    temp = root / f"{_TEMP}{name}"
    final = root / name
    with _explained(output_dir, name, temp):
        if processes.is_main:
            remove_partial(output_dir)
            temp.mkdir(parents=True)
        processes.barrier()
        torch.save(_rank_payload(rank_states or {}), temp / f"rank-{processes.rank:05d}.pt")
        if collective is not None:
            collective.save(temp, processes.is_main)
        if processes.is_main:
            _write_shared(temp, modules, states, config, write_extra)
        processes.barrier()
        if processes.is_main:
            _seal(temp, progress, processes.world_size, identity or {})
            _replace(temp, final)
    if processes.is_main:
        _rotate(output_dir, total_limit)
        logger.info("saved checkpoint %s", final)
    processes.barrier()
    return final


@contextmanager
def _explained(output_dir: str | os.PathLike[str], name: str, temp: Path) -> Iterator[None]:
    """A failed write (disk full...) removes the half-written folder and stops with one line; older
    checkpoints are untouched (rotation runs only after a save completes). With several processes,
    the others stop at their next barrier when this one exits."""
    try:
        with explained_write_errors(f"write checkpoint {name} in {checkpoints_dir(output_dir)}",
                                    checkpoints_dir(output_dir), _intact(output_dir)):
            yield
    except UserError:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _intact(output_dir: str | os.PathLike[str]) -> str:
    found = list_checkpoints(output_dir)
    if not found:
        return "no earlier checkpoint exists; free space and start again"
    return (f"the previous checkpoint {found[-1].name} is intact: free space, then resume with "
            "--resume_from_checkpoint latest")


def _write_shared(temp: Path, modules: Mapping[str, nn.Module], states: Mapping[str, Stateful],
                  config: Any, write_extra: Callable[[Path], None] | None) -> None:
    for name, module in modules.items():
        save_file(trainable_tensors(module), str(temp / f"{name}.safetensors"))
    for name, state in states.items():
        torch.save(state.state_dict(), temp / f"{name}.pt")
    if config is not None:
        (temp / "config.json").write_text(json.dumps(_without_secrets(_jsonable(config)), indent=2))
    if write_extra is not None:
        write_extra(temp)


def _seal(temp: Path, progress: Progress, world_size: int, identity: Mapping[str, Any]) -> None:
    missing = [r for r in range(world_size) if not (temp / f"rank-{r:05d}.pt").is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {temp}: ranks {missing} wrote no state; is the folder on shared storage?")
    meta = {"format": FORMAT, "step": progress.step, "epoch": progress.epoch, "world_size": world_size,
            "identity": dict(identity), "fingerprint": fingerprint(identity),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (temp / META).write_text(json.dumps(meta, indent=2))
    _fsync_tree(temp)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(temp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again, e.g. after resuming from it
        old = final.with_name(f"{_TEMP}old-{final.name}")
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old)
    else:
        temp.rename(final)


def _rotate(output_dir: str | os.PathLike[str], total_limit: int | None) -> None:
    if total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - total_limit)]:
        doomed = old.with_name(f"{_TEMP}delete-{old.name}")
        old.rename(doomed)  # a crash mid-delete leaves only a temporary folder
        shutil.rmtree(doomed)
        logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)


def remove_partial(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary folders left by interrupted saves; return what was removed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_TEMP)]
    for path in partial:
        logger.warning("removing %s, left by an interrupted checkpoint save", path)
        shutil.rmtree(path)
    return partial


# ------------------------------------------------------------------------------ RNG and ranks


def _rank_payload(rank_states: Mapping[str, Stateful]) -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"rng": rng, "states": {name: s.state_dict() for name, s in rank_states.items()}}


def _restore_rng(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    kind, keys, position, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------- loading


def load_checkpoint(
    path: Path,
    *,
    modules: Mapping[str, nn.Module],
    states: Mapping[str, Stateful],
    rank_states: Mapping[str, Stateful] | None = None,
    identity: Mapping[str, Any] | None = None,
    processes: Processes = Processes(),
    collective: Collective | None = None,
) -> Progress:
    """Restore a checkpoint into freshly built objects (built as when it was saved: same trainable
    parameters, optimiser over them in the same order) and this process's RNG; return the progress
    to continue from. With `identity`, first refuse a checkpoint of another configuration.
    Rank states must hold only tensors and plain Python values (they load with weights_only)."""
    meta = (check_compatible(path, identity, processes.world_size, explain=False) if identity is not None
            else read_meta(path))
    same_world = meta["world_size"] == processes.world_size
    for name, module in modules.items():
        _load_trainable(module, path / f"{name}.safetensors")
    if collective is not None:  # before the states: the lr scheduler's state names the optimiser's
        collective.load(path, processes.is_main)
    for name, state in states.items():
        state.load_state_dict(_torch_load(path / f"{name}.pt"))
    own = path / f"rank-{processes.rank:05d}.pt"
    payload = _torch_load(own if same_world else path / "rank-00000.pt")  # elastic: rank 0's position
    for name, state in (rank_states or {}).items():
        if name not in payload["states"]:
            raise UserError(f"checkpoint {path}: rank {processes.rank} has no saved state {name!r}")
        state.load_state_dict(payload["states"][name])
    if same_world or own.is_file():
        _restore_rng(payload["rng"] if same_world else _torch_load(own)["rng"])
    processes.barrier()
    return Progress(step=meta["step"], epoch=meta["epoch"])


def _torch_load(file: Path) -> Any:
    if not file.is_file():
        raise UserError(f"checkpoint {file.parent} lacks {file.name}: it was made by a run that trained "
                        "different parts, or it is damaged")
    return torch.load(file, map_location="cpu", weights_only=True)


def _load_trainable(module: nn.Module, file: Path) -> None:
    if not file.is_file():
        raise UserError(f"checkpoint {file.parent} has no weights {file.name} for this run's trained module")
    saved = load_file(str(file))
    wanted = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    wrong = [n for n in wanted.keys() & saved.keys() if wanted[n].shape != saved[n].shape]
    problems = [f"{len(names)} {what} (e.g. {', '.join(sorted(names)[:3])})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
                if names]
    if problems:
        raise UserError(f"checkpoint weights {file} do not fit the model being trained: {'; '.join(problems)}")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(saved[name])
