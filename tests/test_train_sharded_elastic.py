"""FSDP2 checkpoints resumed on another number of CPU processes (gloo): the sharded state dict reshards.

A 2-process FSDP2 run saves SHARDED_STATE_DICT (`fsdp/`, a torch.distributed.checkpoint). It resumes
with 3 processes (FSDP2 over 3 shards), that checkpoint with 1 process (which trains unsharded and saves
whole files, its optimiser state keyed by position), and that one with 2 processes under FSDP2 again; each
run stops where its checkpoint was taken and saves again at once, and the weights and optimiser state it
restored are compared, tensor by tensor, with the first checkpoint's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_run

from simpletuner.errors import UserError

pytestmark = pytest.mark.slow
SHARDED = {"model_type": "full", "learning_rate": 1e-4, "images": 8, "max_train_steps": 2, "checkpointing_steps": 2,
           "disable_validation": True, "fsdp_enable": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SIMPLETUNER_LOG_LEVEL": "INFO"}


def train(root: Path, model: Path, processes: int, made_by: int | None = None, **options: Any) -> Path:
    """Run `simpletuner train` with `processes` CPU processes (resuming a checkpoint of `made_by` processes);
    returns its step-2 checkpoint."""
    config = write_run(root, model, "sd1x", **{**SHARDED, **options})
    multi = ["--multi_gpu"] if processes > 1 else []
    command = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(29800 + os.getpid() % 100 + processes), "-m", "simpletuner", "train", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    if made_by is not None:
        assert f"was made by {made_by} process(es), this run has {processes}" in done.stdout + done.stderr
    return root / "output" / "checkpoints" / "step-000002"


def read_sharded(checkpoint: Path, scratch: Path) -> dict[str, Any]:
    """The whole model and optimiser state of an `fsdp/` checkpoint, read in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert (checkpoint / "fsdp" / ".metadata").is_file()
    dcp_to_torch_save(checkpoint / "fsdp", scratch)
    return torch.load(scratch, weights_only=True)


def assert_same_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["model"].keys() == expected["model"].keys()
    assert all(torch.equal(got["model"][name], expected["model"][name]) for name in expected["model"])
    saved, restored = expected["optimizer"]["state"], got["optimizer"]["state"]
    assert saved.keys() == restored.keys() and len(saved) > 100
    for name, state in saved.items():
        assert state.keys() == restored[name].keys() == {"exp_avg", "exp_avg_sq", "step"}
        assert all(torch.equal(restored[name][key], value) for key, value in state.items()), name
    assert [g["params"] for g in got["optimizer"]["param_groups"]] == [
        g["params"] for g in expected["optimizer"]["param_groups"]]


def test_a_sharded_fsdp2_checkpoint_resumes_on_three_processes_then_on_one_then_on_two(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    first = train(tmp_path / "two", model, 2)
    dataset = tmp_path / "two" / "dataset"
    saved = read_sharded(first, tmp_path / "two.pt")
    base = load_file(Path(model) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved["model"][name], base[name]) for name in base)  # trained: not the base weights
    assert all(int(state["step"]) == 2 for state in saved["optimizer"]["state"].values())

    # 2 -> 3: torch.distributed.checkpoint reshards 2 shards into 3; the new fsdp/ holds exactly the same state
    three = train(tmp_path / "three", model, 3, 2, dataset=dataset, resume_from_checkpoint=str(first))
    assert_same_state(read_sharded(three, tmp_path / "three.pt"), saved)

    # 3 -> 1: one process trains unsharded; its checkpoint holds the whole weights and optimiser state read from fsdp/
    one = train(tmp_path / "one", model, 1, 3, dataset=dataset, resume_from_checkpoint=str(three))
    weights = load_file(one / "trained.safetensors")
    assert weights.keys() == saved["model"].keys()
    assert all(torch.equal(weights[name], saved["model"][name]) for name in weights)
    optimizer = torch.load(one / "optimizer.pt", weights_only=True)  # keyed by position, as torch writes it
    assert sorted(optimizer["state"]) == list(range(len(saved["optimizer"]["state"])))

    def moments(states: Any) -> list[bytes]:
        return sorted(s["exp_avg"].numpy().tobytes() + s["exp_avg_sq"].numpy().tobytes() for s in states)

    assert moments(optimizer["state"].values()) == moments(saved["optimizer"]["state"].values())

    # 1 -> 2: the unsharded checkpoint (optimiser keyed by position) is sharded on load into FSDP2 again
    again = train(tmp_path / "again", model, 2, 1, dataset=dataset, resume_from_checkpoint=str(one))
    assert_same_state(read_sharded(again, tmp_path / "again.pt"), saved)


def test_an_unsharded_optimizer_state_is_rekeyed_by_name_for_fsdp2():
    """1 -> N: an unsharded checkpoint's optimizer.pt (keyed by position) goes into FSDP2 through
    set_optimizer_state_dict, keyed by parameter name; here into a fresh plain optimiser, which takes the same form."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from simpletuner.train.reshard import by_name

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        module[0].bias.requires_grad_(False)  # frozen: not in the optimiser
        decay = [p for n, p in module.named_parameters() if p.requires_grad and n.endswith("weight")]
        rest = [p for n, p in module.named_parameters() if p.requires_grad and not n.endswith("weight")]
        return module, torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.1)

    module, optimizer = build()
    for _ in range(2):
        module(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
    saved = optimizer.state_dict()
    named = by_name(saved, module, optimizer)
    assert named["param_groups"][0]["params"] == ["0.weight", "1.weight", "2.weight"]
    assert named["param_groups"][1]["params"] == ["1.bias", "2.bias"]

    fresh_module, fresh = build()
    set_optimizer_state_dict(fresh_module, fresh, named, options=StateDictOptions(full_state_dict=True))
    restored = fresh.state_dict()
    def groups(state: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(g["params"], g["lr"], g["weight_decay"], tuple(g["betas"])) for g in state["param_groups"]]

    assert groups(restored) == groups(saved)
    for index, state in saved["state"].items():
        assert all(torch.equal(restored["state"][index][key], value) for key, value in state.items())
    assert by_name(named, module, optimizer) is named  # already by name: unchanged

    other, _ = build()
    other_optimizer = torch.optim.AdamW(list(other.parameters())[:2])
    with pytest.raises(UserError, match="holds 5 parameters, this run's optimiser 2"):
        by_name(saved, other, other_optimizer)
