"""Bad input to `simpletuner train`: a clear message, exit code 2, before long work, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_run

import simpletuner
from simpletuner.cli import main
from simpletuner.train.nonfinite import NonFiniteError, NonFiniteGuard, skips_on_device


def _fails(capsys, config: Path, *overrides: str) -> str:
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _nothing_written(root: Path) -> None:
    output = root / "output"
    assert not (output / "checkpoints").exists()
    assert not (output / "pytorch_lora_weights.safetensors").exists()


def test_model_folder_without_a_component(tmp_path, tiny_model, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd1x"), model)
    shutil.rmtree(model / "unet")
    err = _fails(capsys, write_run(tmp_path, model, "sd1x"))
    assert str(model) in err and "unet" in err
    _nothing_written(tmp_path)


def test_family_that_does_not_match_the_model(tmp_path, tiny_model, capsys):
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sdxl"))
    assert "StableDiffusionPipeline" in err and "model_family 'sdxl'" in err
    _nothing_written(tmp_path)


def test_resolution_the_family_cannot_take(tmp_path, tiny_model, capsys):
    err = _fails(capsys, write_run(tmp_path, tiny_model("sdxl"), "sdxl", validation_resolution="96x50"))
    assert "96x50" in err and "64" in err
    _nothing_written(tmp_path)


def test_empty_dataset(tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=empty))
    assert "shapes" in err and str(empty) in err
    _nothing_written(tmp_path)


def test_unwritable_output_dir(tmp_path, tiny_model, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _fails(capsys, write_run(tmp_path, tiny_model("sd1x"), "sd1x", output_dir=str(blocker / "out")))
    assert "output_dir" in err and "not writable" in err


@pytest.mark.slow
def test_checkpoint_of_another_configuration(tmp_path, tiny_model, capsys):
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", max_train_steps=2, disable_validation=True)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    checkpoints = sorted((tmp_path / "output" / "checkpoints").iterdir())
    err = _fails(capsys, config, "--lora_rank", "8", "--resume_from_checkpoint", "latest", "--max_train_steps", "4")
    assert "different configuration" in err and "lora_rank" in err
    assert sorted((tmp_path / "output" / "checkpoints").iterdir()) == checkpoints


@pytest.mark.parametrize("option", [["--validation_randomize", "true"]])
def test_options_of_features_not_built_yet_are_refused_not_ignored(tmp_path, tiny_model, capsys, option):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x")
    err = _fails(capsys, config, *option)
    assert option[0].lstrip("-") in err and "not implemented in this version yet" in err
    assert main(["config", "check", str(config), *option]) == 2
    assert option[0].lstrip("-") in capsys.readouterr().err
    _nothing_written(tmp_path)


# ---- non-finite updates ---------------------------------------------------------------------------------------
def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_diverging_run_skips_non_finite_updates_stops_and_exports_nothing(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", learning_rate=1e30, max_train_steps=12,
                       max_nonfinite_steps=3, checkpointing_steps=2, disable_validation=True)
    err = _fails(capsys, config)
    assert err.strip().splitlines()[-1].startswith("error: training stopped at step")
    assert "max_nonfinite_steps=3" in err and "nothing was exported" in err
    output = tmp_path / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    rows = _rows(output)
    assert any(row.get("skipped") for row in rows) and rows[-1]["step"] < 12
    text = (output / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: a non-finite value is null
    for checkpoint in (output / "checkpoints").iterdir():  # every checkpoint holds finite weights
        weights = load_file(str(checkpoint / "trained.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint


@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_skips_a_non_finite_update_and_counts_it(fused):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    guard = NonFiniteGuard(limit=2, device="cpu")
    assert skips_on_device(optimizer) is fused  # fused AdamW skips from a device flag, without a host read
    weight.grad = torch.tensor([float("nan"), 1.0, 1.0])
    guard.step(optimizer, guard.flag(torch.tensor(1.0), weight.grad.norm()))
    assert torch.equal(weight.detach(), torch.ones(3))  # no update, and no moments taken from the nan
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in optimizer.state[weight].items() if k != "step")
    guard.check(1)  # one in a row: below the limit
    weight.grad = torch.ones(3)
    guard.step(optimizer, guard.flag(torch.tensor(1.0), weight.grad.norm()))
    assert not torch.equal(weight.detach(), torch.ones(3))  # a finite update steps
    for _ in range(2):
        weight.grad = torch.ones(3)
        guard.step(optimizer, guard.flag(torch.tensor(float("inf")), weight.grad.norm()))
    with pytest.raises(NonFiniteError, match="2 updates in a row"):
        guard.check(4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_guard_with_fused_adamw_on_cuda_never_waits_for_the_host():
    weight = torch.nn.Parameter(torch.ones(1024, device="cuda"))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = NonFiniteGuard(limit=3, device="cuda")
    losses = [torch.tensor(v, device="cuda") for v in (1.0, float("nan"), 1.0)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation below raises
    try:
        for loss in losses:
            weight.grad = torch.ones_like(weight) * loss
            guard.step(optimizer, guard.flag(loss, weight.grad.norm()))
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(optimizer.state[weight]["step"]) == 2  # the nan update was skipped on the device
    assert torch.isfinite(weight).all()
    guard.check(3)


# ---- one run per output_dir -----------------------------------------------------------------------------------
def _train_process(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "simpletuner", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_and_a_stale_lock_is_replaced(tmp_path, tiny_model):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=100000, checkpointing_steps=100000,
                       disable_validation=True)
    lock = tmp_path / "output" / ".simpletuner.lock"
    first = _train_process(config)
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = _train_process(config)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "Traceback" not in err
        assert f"is in use by another training run (pid {first.pid} on host" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        first.kill()  # as kill -9: the lock stays behind, naming a dead process
        first.communicate()
    assert json.loads(lock.read_text())["pid"] == first.pid
    third = subprocess.run([sys.executable, "-m", "simpletuner", "train", str(config), "--max_train_steps", "2"],
                           env={**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1]),
                                "SIMPLETUNER_LOG_LEVEL": "INFO"}, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "removing a stale run lock" in third.stderr
    assert not lock.exists()  # released at the end


# ---- resumed runs log each step once, with the learning rate that step used -------------------------------------
def _purge_steps(logs: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return [event.step for file in sorted(logs.rglob("events.out.tfevents.*"))
            for event in EventFileLoader(str(file)).Load()
            if event.HasField("session_log") and event.session_log.status == SessionLog.START]


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once_with_its_own_learning_rate(tmp_path, tiny_model, capsys, monkeypatch):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=6, checkpointing_steps=2,
                       logging_steps=3, validation_steps=3, lr_scheduler="constant_with_warmup", lr_warmup_steps=6,
                       report_to="tensorboard")
    assert main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert "validating…" in err and "saving a checkpoint…" in err  # the bar says why it pauses
    output = tmp_path / "output"
    first = _rows(output)
    assert [row["step"] for row in first] == [1, 2, 3, 4, 5, 6]
    # warm-up: update n used 1e-3 * (n - 1) / 6, each its own value (not the window's last one for all)
    assert [row["lr"] for row in first] == pytest.approx([1e-3 * n / 6 for n in range(6)])
    with (output / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "lo')  # as a run killed mid-write leaves it
    monkeypatch.setenv("SIMPLETUNER_LOG_LEVEL", "INFO")
    assert main(["train", str(config), "--resume_from_checkpoint", "step-000002"]) == 0
    err = capsys.readouterr().err
    assert "INFO simpletuner.train.trainer: resumed from" in err and "WARNING simpletuner.train.trainer" not in err
    again = _rows(output)
    assert [row["step"] for row in again] == [1, 2, 3, 4, 5, 6]  # steps 3-6 of the first run were dropped
    assert [row["loss"] for row in again] == pytest.approx([row["loss"] for row in first])
    assert _purge_steps(output / "logs") == [1, 3]  # TensorBoard drops what the first run logged after step 2


# ---- a full disk while saving a checkpoint or exporting ---------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root: mount -t tmpfs); a real full disk, not a simulated error."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("ab") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_keeps_the_checkpoint_and_resume_works(tmp_path, tiny_model, capsys,
                                                                              small_disk):
    output = small_disk / "output"
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", output_dir=str(output), max_train_steps=2,
                       checkpointing_steps=2, disable_validation=True)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    checkpoints = output / "checkpoints"
    lora = output / "pytorch_lora_weights.safetensors"
    exported = lora.read_bytes()
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"]

    filler = _fill(small_disk, leave=64 * 1024)  # less than a checkpoint (about 220 kB)
    err = _fails(capsys, config, *resume)
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot write checkpoint step-000004") and "no space left on device" in line
    assert "step-000002 is intact" in line
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]  # nothing half-written stays
    assert lora.read_bytes() == exported

    filler.unlink()
    checkpoint_bytes = sum(f.stat().st_size for f in (checkpoints / "step-000002").rglob("*") if f.is_file())
    # room for the checkpoint, not for the export after it
    filler = _fill(small_disk, leave=checkpoint_bytes + len(exported) // 2)
    err = _fails(capsys, config, *resume)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot export the model into {output}") and "final checkpoint is complete" in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    assert lora.read_bytes() == exported  # the earlier export is untouched, never half-overwritten

    filler.unlink()
    assert main(["train", str(config), *resume]) == 0
    assert lora.read_bytes() != exported and not (output / ".tmp-export").exists()


# ---- a Hub model id that cannot be fetched ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_without_network_says_how_to_train_offline(tmp_path, tiny_model, offline):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", pretrained_model_name_or_path="someorg/somemodel")
    env = {**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1]), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: as a machine without network
    env.pop("SIMPLETUNER_LOG_LEVEL", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "simpletuner", "train", str(config)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the hub's retry chatter stays quiet
    assert "'someorg/somemodel'" in result.stderr and "local folder" in result.stderr
    assert ("HF_HUB_OFFLINE is set" if offline else "set HF_HUB_OFFLINE=1") in result.stderr


def test_train_refuses_a_missing_optional_package_before_any_long_work(tmp_path, tiny_model):
    (tmp_path / "lycoris.json").write_text('{"algo": "lokr", "multiplier": 1.0, "linear_dim": 4}')
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", lora_type="lycoris",
                       lycoris_config=str(tmp_path / "lycoris.json"))
    code = ("import sys\nsys.modules['lycoris'] = None  # as if lycoris-lora were not installed\n"
            f"from simpletuner.cli import main\nraise SystemExit(main(['train', {str(config)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1])})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: lora_type='lycoris' needs the 'lycoris' package, which is not "
                                     "installed: `pip install lycoris-lora`")
    assert not (tmp_path / "cache").exists()  # nothing was scanned or cached
    _nothing_written(tmp_path)


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG

    return apply


@pytest.mark.slow
def test_a_file_size_limit_while_saving_a_checkpoint_is_one_line_and_resume_works(tmp_path, tiny_model, capsys):
    """Without root (no tmpfs), the same boundary through RLIMIT_FSIZE: the optimiser state (about 130 kB)
    cannot be written, everything else of the resumed run can."""
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, checkpointing_steps=2,
                       disable_validation=True, report_to="none")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    env = {**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1])}
    limited = subprocess.run([sys.executable, "-m", "simpletuner", "train", str(config), *resume], env=env,
                             capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(100_000))
    assert limited.returncode == 2 and "Traceback" not in limited.stderr
    line = limited.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write checkpoint step-000004") and "step-000002 is intact" in line
    checkpoints = tmp_path / "output" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]
    assert main(["train", str(config), *resume]) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_encoder_training_on_a_t5_family_is_refused_naming_both(tmp_path, tiny_model, capsys, family):
    err = _fails(capsys, write_run(tmp_path, tiny_model(family), family, train_text_encoder=True))
    assert "train_text_encoder" in err and f"model_family {family!r}" in err and "T5" in err
    _nothing_written(tmp_path)
