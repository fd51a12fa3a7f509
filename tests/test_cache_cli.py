"""`simpletuner cache verify|prune CONFIG` through the real CLI entry point."""

import json

import pytest
import torch

from simpletuner.cache.format import SHARDS
from simpletuner.cache.store import TensorStore
from simpletuner.cli import main


def write_config(tmp_path, cache_dir="cache", extra_dataset=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    datasets = [{"id": "pics", "type": "local", "instance_data_dir": str(tmp_path / "images")},
                {"id": "captions", "type": "local", "dataset_type": "text_embeds", "default": True}]
    if extra_dataset:
        datasets.append(extra_dataset)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {"model_family": "sdxl", "pretrained_model_name_or_path": "org/model",
              "data_backend_config": str(tmp_path / "multidatabackend.json"), "cache_dir": str(tmp_path / cache_dir)}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def fill(location, n=6):
    store = TensorStore(str(location))
    with store.writer("w", shard_entries=2) as writer:
        for i in range(n):
            writer.put(f"{i:032x}", {"mean": torch.zeros(4, 4, 4), "std": torch.ones(4, 4, 4)})
    return store


def test_verify_reports_sound_and_corrupt_stores(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["cache", "verify", config]) == 0
    assert "not built yet" in capsys.readouterr().out
    latents = tmp_path / "cache" / "vae" / "pics"
    fill(latents)
    assert main(["cache", "verify", config]) == 0
    out = capsys.readouterr().out
    assert "6 entries in 3 shards" in out and "OK" in out

    shard = sorted((latents / SHARDS).iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["cache", "verify", config]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out and shard.name in out
    assert main(["cache", "verify", config, "--repair"]) == 0
    assert "dropped 2" in capsys.readouterr().out
    assert len(TensorStore(str(latents))) == 4
    assert main(["cache", "verify", "--store", str(latents)]) == 0


def test_verify_accepts_overrides(tmp_path, capsys):
    config = write_config(tmp_path)
    fill(tmp_path / "other" / "vae" / "pics", n=3)
    assert main(["cache", "verify", config, "--cache_dir", str(tmp_path / "other")]) == 0
    assert "3 entries" in capsys.readouterr().out


def real_config(tmp_path, tiny_model):
    """A configuration over a tiny SDXL model and a small procedural dataset."""
    from train_helpers import write_run

    return str(write_run(tmp_path, tiny_model("sdxl"), "sdxl", images=6))


def test_cache_encodes_once_and_prune_removes_what_is_no_longer_used(tmp_path, tiny_model, capsys):
    config = real_config(tmp_path, tiny_model)
    assert main(["cache", config]) == 0
    out = capsys.readouterr().out
    assert "latents: 6 unique, 0 already cached, 6 encoded" in out
    assert main(["cache", config]) == 0
    assert "latents: 6 unique, 6 already cached, 0 encoded" in capsys.readouterr().out

    latents = tmp_path / "cache" / "vae" / "shapes"
    fill(latents, n=3)  # entries no configuration reads (e.g. an old crop)
    gone = tmp_path / "cache" / "vae" / "gone"
    fill(gone)
    (tmp_path / "cache" / "vae" / "notastore").mkdir()
    assert main(["cache", "prune", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove unused cache" in out and gone.exists() and "would remove 3 of 9 entries" in out
    assert main(["cache", "prune", config]) == 0
    out = capsys.readouterr().out
    assert "removing unused cache" in out and str(gone) in out
    assert not gone.exists()
    assert len(TensorStore(str(latents))) == 6
    assert (tmp_path / "cache" / "vae" / "notastore").exists()
    assert main(["cache", config]) == 0
    assert "6 already cached, 0 encoded" in capsys.readouterr().out


def test_cache_inside_a_dataset_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    config = write_config(tmp_path, extra_dataset={
        "id": "bad", "type": "local", "instance_data_dir": str(tmp_path / "images2"),
        "cache_dir_vae": str(tmp_path / "images2" / "latents")})
    (tmp_path / "images2").mkdir()
    assert main(["cache", "verify", config]) == 2
    err = capsys.readouterr().err
    assert "inside dataset 'bad'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["cache", "explode", "x.toml"], ["cache", "prune"], ["cache", "verify"]])
def test_bad_invocations_are_user_errors(argv, capsys):
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
