import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.errors import UserError
from simpletuner.train.checkpoint import (
    Processes,
    Progress,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    resumed_accumulation,
    run_identity,
    save_checkpoint,
)
from simpletuner.train.ema import EMA
from simpletuner.train.optim import build_optimizer
from simpletuner.train.schedules import build_lr_scheduler

DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
TOTAL_STEPS = 12


def _cfg(**options) -> TrainingConfig:
    base = dict(model_family="sd1x", pretrained_model_name_or_path="tiny", learning_rate=1e-2,
                lr_scheduler="cosine", lr_warmup_steps=3, use_ema=True)
    return TrainingConfig(**{**base, **options})


class ToySampler:
    """Draws batches in an order shuffled by python's and numpy's global RNG, like a real sampler."""

    def __init__(self, size: int, batch: int) -> None:
        self.size, self.batch, self.order, self.position = size, batch, [], 0

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch > len(self.order):
            self.order = [int(i) for i in np.random.permutation(self.size)]
            random.shuffle(self.order)
            self.position = 0
        picked = self.order[self.position: self.position + self.batch]
        self.position += self.batch
        return DATA[picked]

    def state_dict(self) -> dict:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = list(state["order"]), state["position"]


class Run:
    """Everything a training run holds, built fresh from a seed."""

    def __init__(self, cfg: TrainingConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.GELU(), nn.Linear(16, 1))
        # a frozen parameter is not saved: like pretrained weights, it is the same in every run
        self.model[0].bias.data = torch.linspace(-1, 1, 16)
        self.model[0].bias.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, cfg, "cpu")
        self.scheduler = build_lr_scheduler(self.optimizer, cfg, TOTAL_STEPS)
        self.ema = EMA(self.model.parameters(), decay=0.9)
        self.sampler = ToySampler(len(DATA), batch=8)

    def train(self, first_step: int, last_step: int) -> list[float]:
        losses = []
        for step in range(first_step, last_step + 1):
            batch = self.sampler.next_batch()
            noise = torch.randn_like(batch)  # draws from the global torch RNG, as the trainer will
            loss = (self.model(batch + 0.1 * noise) - batch.sum(1, keepdim=True)).pow(2).mean()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.ema.update(step)
            losses.append(loss.item())
        return losses

    def save(self, output_dir: Path, step: int, cfg: TrainingConfig, **kwargs) -> Path:
        return save_checkpoint(output_dir, Progress(step=step, epoch=0), modules={"model": self.model},
                               states=self.states(), rank_states={"sampler": self.sampler}, config=cfg,
                               identity=run_identity(cfg), **kwargs)

    def load(self, path: Path, cfg: TrainingConfig) -> Progress:
        return load_checkpoint(path, modules={"model": self.model}, states=self.states(),
                               rank_states={"sampler": self.sampler}, identity=run_identity(cfg))

    def states(self) -> dict:
        return {"optimizer": self.optimizer, "lr_scheduler": self.scheduler, "ema": self.ema}


def _seed_everything(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def test_resume_is_exact(tmp_path):
    cfg = _cfg()
    half = TOTAL_STEPS // 2
    _seed_everything(7)
    straight = Run(cfg, seed=1)
    straight_losses = straight.train(1, TOTAL_STEPS)

    _seed_everything(7)
    first = Run(cfg, seed=1)
    losses = first.train(1, half)
    saved = first.save(tmp_path, half, cfg)
    del first
    _seed_everything(123)  # the resumed process starts from other random states and weights
    resumed = Run(cfg, seed=99)
    progress = resumed.load(saved, cfg)
    assert progress == Progress(step=half, epoch=0)
    losses += resumed.train(progress.step + 1, TOTAL_STEPS)

    assert losses == straight_losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow, resumed.ema.shadow))
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_layout_and_metadata(tmp_path):
    cfg = _cfg()
    run = Run(cfg, seed=1)
    run.train(1, 2)
    extra = []
    path = run.save(tmp_path, 2, cfg, write_extra=lambda folder: extra.append(folder) or
                    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x"))
    assert path == tmp_path / "checkpoints" / "step-000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "ema.pt", "lr_scheduler.pt", "meta.json", "model.safetensors", "optimizer.pt",
        "pytorch_lora_weights.safetensors", "rank-00000.pt"]
    assert extra[0].name.startswith(".tmp-")  # extras are written before the folder is sealed
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["world_size"]) == (2, 0, 1)
    assert meta["identity"]["lora_rank"] == 16 and len(meta["fingerprint"]) == 16
    assert json.loads((path / "config.json").read_text())["lr_scheduler"] == "cosine"
    from safetensors.torch import load_file
    assert set(load_file(path / "model.safetensors")) == {"0.weight", "3.weight", "3.bias"}
    assert list((tmp_path / "checkpoints").iterdir()) == [path]


def test_rotation_keeps_the_newest(tmp_path):
    cfg = _cfg()
    run = Run(cfg, seed=1)
    for step in (1, 2, 3):
        run.save(tmp_path, step, cfg, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


def test_a_failed_save_leaves_earlier_checkpoints_and_is_cleaned_later(tmp_path):
    cfg = _cfg()
    run = Run(cfg, seed=1)
    run.save(tmp_path, 1, cfg, total_limit=1)

    def crash(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(UserError, match="cannot write checkpoint step-000002 .*: disk full") as caught:
        run.save(tmp_path, 2, cfg, total_limit=1, write_extra=crash)
    assert "step-000001 is intact" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "checkpoints" / ".tmp-step-000002").exists()  # the half-written folder is gone
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "step-000001"
    (tmp_path / "checkpoints" / ".tmp-step-000002").mkdir()  # as a kill -9 mid-save leaves it
    run.save(tmp_path, 3, cfg, total_limit=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_saving_a_step_again_replaces_it(tmp_path):
    cfg = _cfg()
    run = Run(cfg, seed=1)
    first = run.save(tmp_path, 5, cfg)
    run.train(1, 1)
    again = run.save(tmp_path, 5, cfg)
    assert first == again and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]
    fresh = Run(cfg, seed=2)
    fresh.load(again, cfg)
    assert torch.equal(fresh.model[0].weight, run.model[0].weight)


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None
    root = tmp_path / "checkpoints"
    for name in ("step-999999", "step-1000000", "step-000005"):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text("{}")
    (root / "step-2000000").mkdir()  # incomplete: no meta.json
    (root / ".tmp-step-3000000").mkdir()
    assert resolve_resume(tmp_path, "latest") == root / "step-1000000"
    assert resolve_resume(tmp_path, "step-000005") == root / "step-000005"
    assert resolve_resume(tmp_path, str(root / "step-999999")) == root / "step-999999"
    with pytest.raises(UserError, match=r"not a complete checkpoint \(no meta.json\)"):
        resolve_resume(tmp_path, "step-2000000")
    with pytest.raises(UserError, match=r"'step-42': no such checkpoint folder.*step-000005, step-999999"):
        resolve_resume(tmp_path, "step-42")


def test_another_configuration_is_refused_before_loading(tmp_path):
    cfg = _cfg(resolution=1024)
    path = Run(cfg, seed=1).save(tmp_path, 1, cfg)
    other = _cfg(lora_rank=8, resolution=512)
    with pytest.raises(UserError, match=r"(?s)different configuration.*lora_rank: checkpoint has 16, this run 8"
                                        r".*resolution: checkpoint has 1024(.0)?, this run 512(.0)?"):
        check_compatible(path, run_identity(other))
    check_compatible(path, run_identity(cfg), world_size=2)  # another number of processes: elastic resume
    (path / "deepspeed").mkdir()  # ZeRO partitions are per process
    with pytest.raises(UserError, match="number of processes: checkpoint has 1, this run 2 \\(a DeepSpeed"):
        check_compatible(path, run_identity(cfg), world_size=2)
    check_compatible(path, run_identity(_cfg(resolution=1024, learning_rate=5e-3)), world_size=1)  # harmless


def test_identity_covers_datasets_without_credentials():
    cfg = _cfg()
    one = DatasetConfig(id="a", type="aws", aws_bucket_name="bucket", aws_secret_access_key="s3cret")
    rotated = one.model_copy(update={"aws_secret_access_key": "other"})
    resized = one.model_copy(update={"resolution": 512})
    assert run_identity(cfg, [one]) == run_identity(cfg, [rotated])
    assert run_identity(cfg, [one])["datasets"] != run_identity(cfg, [resized])["datasets"]
    assert run_identity(cfg, [one])["dataset_ids"] == ["a"]
    assert "s3cret" not in json.dumps(run_identity(cfg, [one]))


def test_weights_of_another_shape_are_refused(tmp_path):
    cfg = _cfg()
    path = Run(cfg, seed=1).save(tmp_path, 1, cfg)
    other = Run(cfg, seed=1)
    other.model[3] = nn.Linear(16, 2)
    expected = r"do not fit the model being trained: 2 of another shape \(e.g. 3.bias, 3.weight\)"
    with pytest.raises(UserError, match=expected):
        load_checkpoint(path, modules={"model": other.model}, states={})


def test_every_rank_writes_its_state_and_rank_0_seals(tmp_path):
    cfg = _cfg()
    barrier = threading.Barrier(2)
    runs = [Run(cfg, seed=1), Run(cfg, seed=1)]
    for rank, run in enumerate(runs):
        run.sampler.position = 10 + rank
    results, errors = {}, []

    def save(rank: int) -> None:
        try:
            processes = Processes(rank=rank, world_size=2, barrier=barrier.wait)
            results[rank] = save_checkpoint(tmp_path, Progress(4, 1), modules={"model": runs[rank].model},
                                            states=runs[rank].states(), processes=processes,
                                            rank_states={"sampler": runs[rank].sampler})
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(rank,)) for rank in range(2)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert not errors
    assert results[0] == results[1] == tmp_path / "checkpoints" / "step-000004"
    assert {"rank-00000.pt", "rank-00001.pt"} <= {p.name for p in results[0].iterdir()}
    for rank in range(2):
        fresh = Run(cfg, seed=3)
        load_checkpoint(results[0], modules={"model": fresh.model}, states={},
                        rank_states={"sampler": fresh.sampler}, processes=Processes(rank=rank, world_size=2))
        assert fresh.sampler.position == 10 + rank


def _save_at(tmp_path, cfg, world_size: int, positions: list[int]) -> tuple[Path, "Run"]:
    """A checkpoint written by `world_size` threads as ranks, after 3 identical training steps each."""
    barrier = threading.Barrier(world_size)
    runs = [Run(cfg, seed=1) for _ in range(world_size)]
    for run in runs:
        _seed_everything(7)
        run.train(1, 3)
    errors = []

    def save(rank: int) -> None:
        try:
            runs[rank].sampler.position = positions[rank]
            save_checkpoint(tmp_path, Progress(4, 0), modules={"model": runs[rank].model}, states=runs[rank].states(),
                            processes=Processes(rank=rank, world_size=world_size, barrier=barrier.wait),
                            rank_states={"sampler": runs[rank].sampler}, config=cfg.model_dump(mode="json"),
                            identity=run_identity(cfg))
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(rank,)) for rank in range(world_size)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert not errors
    return tmp_path / "checkpoints" / "step-000004", runs[0]


@pytest.mark.parametrize("saved, resumed", [(4, 2), (2, 3), (2, 1)])
def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, caplog, saved, resumed):
    cfg = _cfg()
    path, source = _save_at(tmp_path, cfg, saved, [7] * saved)  # ranks share their position, as samplers do
    with caplog.at_level("INFO", logger="simpletuner"):
        check_compatible(path, run_identity(cfg), world_size=resumed)
    assert f"made by {saved} process(es), this run has {resumed}" in caplog.text
    for rank in range(resumed):
        fresh = Run(cfg, seed=5)
        progress = load_checkpoint(path, modules={"model": fresh.model}, states=fresh.states(),
                                   rank_states={"sampler": fresh.sampler}, identity=run_identity(cfg),
                                   processes=Processes(rank=rank, world_size=resumed))
        assert progress == Progress(4, 0) and fresh.sampler.position == 7
        for mine, theirs in zip(fresh.model.parameters(), source.model.parameters()):
            assert torch.equal(mine, theirs)
        for mine, theirs in zip(fresh.optimizer.state_dict()["state"].values(),
                                source.optimizer.state_dict()["state"].values()):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        for mine, theirs in zip(fresh.ema.state_dict()["shadow"], source.ema.state_dict()["shadow"]):
            assert torch.equal(mine, theirs)
        assert fresh.scheduler.state_dict() == source.scheduler.state_dict()


@pytest.mark.parametrize("saved, accumulation, resumed, expected", [(4, 1, 2, 2), (2, 3, 3, 2), (2, 2, 1, 4),
                                                                     (2, 2, 2, 9)])
def test_keep_global_batch_adjusts_accumulation(tmp_path, saved, accumulation, resumed, expected):
    cfg = _cfg(gradient_accumulation_steps=accumulation)
    path, _ = _save_at(tmp_path, cfg, saved, [0] * saved)
    meta = check_compatible(path, run_identity(cfg), world_size=resumed)
    assert resumed_accumulation(path, meta, resumed, 9, keep_global_batch=True) == expected  # same size: as set
    assert resumed_accumulation(path, meta, resumed, 9, keep_global_batch=False) == 9


def test_keep_global_batch_refuses_a_size_that_cannot_divide_it(tmp_path):
    cfg = _cfg(gradient_accumulation_steps=1)
    path, _ = _save_at(tmp_path, cfg, 2, [0, 0])
    meta = check_compatible(path, run_identity(cfg), world_size=3)
    with pytest.raises(UserError, match=r"resume_keep_global_batch: checkpoint step-000004 trained with 2 "
                                        r"process\(es\) x gradient_accumulation_steps 1 = 2 .*3 processes cannot"):
        resumed_accumulation(path, meta, 3, 1, keep_global_batch=True)


def test_processes_from_an_accelerator():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    processes = Processes.from_accelerator(accelerator)
    assert (processes.rank, processes.world_size, processes.is_main) == (0, 1, True)
    processes.barrier()


TWO_PROCESS_SCRIPT = '''
import json, sys
import torch
from accelerate import Accelerator
from simpletuner.train.checkpoint import Processes, Progress, list_checkpoints, load_checkpoint, save_checkpoint


class Position:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"position": self.value}

    def load_state_dict(self, state):
        self.value = state["position"]


out = sys.argv[1]
accelerator = Accelerator(cpu=True)
processes = Processes.from_accelerator(accelerator)
rank = processes.rank
torch.manual_seed(0)
model = accelerator.prepare(torch.nn.Linear(3, 1))
optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters()))
accelerator.backward(model(torch.randn(4, 3) + rank).pow(2).mean())  # each rank its own data, DDP averages
optimizer.step()
torch.manual_seed(100 + rank)
for step in (1, 2, 3):
    save_checkpoint(out, Progress(step, 0), modules={"model": accelerator.unwrap_model(model)},
                    states={"optimizer": optimizer}, rank_states={"sampler": Position(10 * step + rank)},
                    processes=processes, total_limit=2)
after_save = torch.rand(3).tolist()
torch.manual_seed(999)
sampler = Position(-1)
progress = load_checkpoint(list_checkpoints(out)[-1], modules={"model": accelerator.unwrap_model(model)},
                           states={"optimizer": optimizer}, rank_states={"sampler": sampler}, processes=processes)
result = {"step": progress.step, "sampler": sampler.value, "after_save": after_save,
          "after_load": torch.rand(3).tolist(),
          "weight": accelerator.unwrap_model(model).weight.tolist()}
with open(f"{out}/result-{rank}.json", "w") as handle:
    json.dump(result, handle)
'''


@pytest.mark.slow
def test_two_processes_save_and_resume_their_own_state(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((out / f"result-{rank}.json").read_text()) for rank in range(2)]
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert {"rank-00000.pt", "rank-00001.pt"} <= {p.name for p in (out / "checkpoints" / "step-000003").iterdir()}
    for rank, result in enumerate(results):
        assert (result["step"], result["sampler"]) == (3, 30 + rank)
        assert result["after_load"] == result["after_save"]  # each rank's own RNG came back
    assert results[0]["after_load"] != results[1]["after_load"]
    assert results[0]["weight"] == results[1]["weight"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_is_restored(tmp_path):
    model = nn.Linear(2, 2).cuda()
    path = save_checkpoint(tmp_path, Progress(1, 0), modules={"model": model}, states={})
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(12345)
    load_checkpoint(path, modules={"model": model}, states={})
    assert torch.equal(torch.rand(4, device="cuda"), expected)
