import importlib.util
import logging

import pytest
from PIL import Image

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.train.trackers import choose_backend, open_tracker, training_scalars


def _cfg(tmp_path, **options) -> TrainingConfig:
    return TrainingConfig(model_family="sd1x", pretrained_model_name_or_path="unused", output_dir=str(tmp_path),
                          **options)


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_training_scalars_have_canonical_names():
    assert training_scalars(loss=0.5, learning_rate=1e-4, grad_norm=None, samples_per_second=3,
                            data_wait_seconds=0.25) == {
        "train/loss": 0.5, "train/learning_rate": 1e-4, "train/samples_per_second": 3.0,
        "train/data_wait_seconds": 0.25}


def test_tensorboard_records_scalars_and_images(tmp_path):
    import torch

    cfg = _cfg(tmp_path, report_to="tensorboard", tracker_run_name="first")
    with open_tracker(cfg, run_config={"learning_rate": 1e-4}) as tracker:
        assert tracker.name == "tensorboard"
        for step, loss in ((1, 0.75), (2, 0.5)):
            tracker.log_scalars(training_scalars(loss=torch.tensor(loss), learning_rate=1e-4, grad_norm=2.0), step)
        tracker.log_images({"validation/cat": [Image.new("RGB", (16, 8), "red"), Image.new("RGB", (8, 8), "blue")]},
                           step=2)
    events = _events(tmp_path / "logs" / "first")
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.75), (2, 0.5)]
    assert [e.value for e in events.Scalars("train/grad_norm")] == [2.0, 2.0]
    assert sorted(events.Tags()["images"]) == ["validation/cat/0", "validation/cat/1"]
    first = events.Images("validation/cat/0")[0]
    assert (first.step, first.width, first.height) == (2, 16, 8)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_other_processes_and_none_log_nothing(tmp_path):
    for tracker in (open_tracker(_cfg(tmp_path), is_main_process=False),
                    open_tracker(_cfg(tmp_path, report_to="none"))):
        assert tracker.name is None
        tracker.log_scalars({"train/loss": 1.0}, 1)
        tracker.log_images({"x": [Image.new("RGB", (4, 4))]}, 1)
        tracker.finish()
    assert not (tmp_path / "logs").exists()


def test_missing_tensorboard_falls_back_to_none(tmp_path, monkeypatch, caplog):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else real_find_spec(name))
    logger = logging.getLogger("simpletuner")  # may not propagate to the root (setup_logging)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="simpletuner"):
            assert open_tracker(_cfg(tmp_path, report_to="tensorboard")).name is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "pip install tensorboard" in caplog.text


def test_wandb_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"report_to='wandb' needs the 'wandb' package.*pip install wandb"):
        choose_backend("wandb")


def test_wandb_offline_records_the_run(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            open_tracker(_cfg(tmp_path, report_to="wandb"))
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, report_to="wandb", tracker_run_name="offline-test")
    with open_tracker(cfg, run_config={"learning_rate": 1e-4}) as tracker:
        assert tracker.name == "wandb"
        tracker.log_scalars(training_scalars(loss=0.375, learning_rate=1e-4), step=1)
        tracker.log_images({"validation": [Image.new("RGB", (8, 8), "red")]}, step=1)
        run = tracker.backend.run
        assert (run.project, run.name, run.config["learning_rate"]) == ("simpletuner", "offline-test", 1e-4)
    import wandb

    wandb.teardown()  # waits for wandb's service process to write everything
    [run_dir] = (tmp_path / "logs" / "wandb").glob("offline-run-*")
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"train/loss" in record and b"0.375" in record
    assert len(list((run_dir / "files" / "media" / "images").glob("validation_1_*.png"))) == 1
    assert len(list((run_dir / "files" / "media" / "images").glob("validation_1_*.png"))) == 1
