"""A trained module's weights and optimiser state, read from a checkpoint whatever sharding wrote it.

A checkpoint folder holds them in one of two layouts:

- sharded: `fsdp/`, a torch.distributed.checkpoint (FSDP2's SHARDED_STATE_DICT): each process's shard plus
  metadata from which any number of processes, or one process without a process group, reads what it holds;
- whole: `trained.safetensors` and `optimizer.pt`, written by unsharded runs (optimiser state keyed by
  position, as `Optimizer.state_dict()` writes it) and by FSDP2's FULL_STATE_DICT (keyed by parameter name).

Both load through torch.distributed.checkpoint's state-dict API, which fits them to the module as this run
holds it (sharded by FSDP2 over any number of processes, or whole), so a checkpoint resumes under another
sharding and another number of processes: 2 FSDP2 processes -> 3, 3 -> 1 process (which trains unsharded),
1 -> 2 FSDP2 processes (tests/test_train_sharded_elastic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simpletuner.errors import UserError

SHARDED_FOLDER = "fsdp"
WEIGHTS = "trained.safetensors"
OPTIMIZER = "optimizer.pt"


def is_sharded(folder: Path) -> bool:
    """Whether the checkpoint holds its weights as a torch.distributed.checkpoint (`fsdp/`)."""
    return (folder / SHARDED_FOLDER).is_dir()


def optimizer_by_name(folder: Path) -> bool:
    """Whether the checkpoint's whole optimizer.pt is keyed by parameter name (FSDP2 FULL_STATE_DICT)."""
    file = folder / OPTIMIZER
    if not file.is_file():
        return False
    groups = torch.load(file, map_location="cpu", weights_only=True).get("param_groups") or [{}]
    return any(isinstance(name, str) for group in groups for name in group.get("params", ()))


def _options(full: bool, **extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, **extra)


def load_sharded(folder: Path, module: nn.Module, optimizer: Any) -> None:
    """Read `fsdp/` into the module and optimiser as they are held here (resharded as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_FOLDER))
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, optimizer, state["optimizer"])


def load_whole(folder: Path, module: nn.Module, optimizer: Any, *, read: bool = True, broadcast: bool = False) -> None:
    """Read trained.safetensors and optimizer.pt (either keying) into the module and optimiser. With
    `broadcast`, only the process with `read` reads the files and the others receive them."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (folder / WEIGHTS).is_file():
        raise UserError(f"checkpoint {folder} holds no trained weights: neither {SHARDED_FOLDER}/ nor {WEIGHTS}")
    weights = load_file(str(folder / WEIGHTS)) if read else {}
    optim = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True) if read else {}
    if read:
        _check_names(folder, module, weights)
        optim = by_name(optim, module, optimizer)
    set_model_state_dict(module, weights, options=_options(True, broadcast_from_rank0=broadcast,
                                                            strict=False))  # frozen weights and buffers are not saved
    set_optimizer_state_dict(module, optimizer, optim, options=_options(True, broadcast_from_rank0=broadcast))


def _check_names(folder: Path, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    wanted = {name for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
    problems = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if problems:
        raise UserError(f"checkpoint weights {folder / WEIGHTS} do not fit the model being trained: "
                        f"{'; '.join(problems)}")


def by_name(state: dict[str, Any], module: nn.Module, optimizer: Any) -> dict[str, Any]:
    """An optimiser state dict keyed by position (Optimizer.state_dict()) rekeyed by parameter name, as
    torch.distributed.checkpoint's set_optimizer_state_dict takes it. Positions count this optimiser's
    parameters group by group, which is how the checkpoint's optimiser (built the same way) numbered them."""
    groups = state.get("param_groups", [])
    if not any(isinstance(p, int) for group in groups for p in group.get("params", ())):
        return state  # already by name
    name_of = {id(p): name for name, p in module.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [p for group in groups for p in group["params"]]
    if sorted(saved) != list(range(len(names))):
        raise UserError(f"checkpoint optimiser state holds {len(saved)} parameters, this run's optimiser "
                        f"{len(names)}: it was made for other trained parameters")
    return {"state": {names[i]: value for i, value in state.get("state", {}).items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in groups]}


def load_either(folder: Path, module: nn.Module, optimizer: Any, *, read: bool = True,
                broadcast: bool = False) -> None:
    """Read whichever layout the checkpoint has into the module and optimiser."""
    if is_sharded(folder):
        load_sharded(folder, module, optimizer)
    else:
        load_whole(folder, module, optimizer, read=read, broadcast=broadcast)


@dataclass
class Reader:
    """A checkpoint's `collective` part for an unsharded run resuming a checkpoint FSDP2 wrote (sharded, or
    whole with the optimiser keyed by name): every process reads the weights and optimiser state whole."""

    module: nn.Module
    optimizer: Any

    def save(self, folder: Path, is_main: bool) -> None:
        raise RuntimeError("Reader only loads; unsharded runs save trained.safetensors and optimizer.pt")

    def load(self, folder: Path, is_main: bool) -> None:
        load_either(folder, self.module, self.optimizer)


def written_by_fsdp(folder: Path) -> bool:
    """Whether an unsharded run must read this checkpoint through `Reader` rather than the plain files."""
    return is_sharded(folder) or optimizer_by_name(folder)


__all__ = ["Reader", "by_name", "is_sharded", "load_either", "load_sharded", "load_whole", "optimizer_by_name",
           "written_by_fsdp"]
