"""What training does with images that fail and cache entries that are corrupt, on real files and a tiny model.

An image that fails to load leaves the sampler (cached up front or on demand) and is reported; every
sample a batch holds is its own image's latent (checked against a fresh encode of that image); a corrupt
cache entry is encoded again from its source, or, with the source gone, the run stops with one line
naming `simpletuner cache verify --repair`; a full disk while writing the cache is one line too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from bad_inputs import bomb_png, broken_png
from train_helpers import own_latent, prepared_data, write_run

from simpletuner.cli import main
from simpletuner.demo.dataset import write_dataset

BAD = {"broken.png", "wide-a.png", "wide-b.png"}  # fail when decoded
BOMB = "bomb.png"  # its header is over Pillow's limit: the scan leaves it out


def _bad_dataset(root: Path) -> Path:
    dataset = write_dataset(root / "dataset", count=12)
    broken_png(dataset / "broken.png")
    bomb_png(dataset / "bomb.png")
    for name in ("wide-a.png", "wide-b.png"):  # a 4:1 bucket of their own, every image failing
        broken_png(dataset / name, (128, 32))
    for name in BAD | {BOMB}:
        (dataset / name).with_suffix(".txt").write_text("a failing picture\n")
    return dataset


@pytest.mark.parametrize("on_demand", [False, True], ids=["cached", "on-demand"])
def test_failed_images_leave_the_epoch_and_nothing_stands_in(tmp_path, tiny_model, on_demand):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=_bad_dataset(tmp_path))
    data, family, components, sampler = prepared_data(config, on_demand)
    shapes = data.datasets["shapes"]
    seen: list[str] = []
    for _ in range(2 * sampler.steps_in_epoch):
        refs = next(sampler)
        usable, entries = data.entries(refs)
        if not usable:  # every image of this batch failed (on demand): training draws the next batch
            continue
        batch = data.batch(usable, family, components, random.Random(0))
        assert torch.equal(batch["latent_mean"], torch.stack([entry["mean"] for entry in entries]))
        for ref, entry in zip(usable, entries):  # each sample's latent is its own image's
            assert torch.allclose(entry["mean"], own_latent(data, family, components, ref), atol=1e-5), ref.path
        seen += [ref.path for ref in usable]
    assert not (BAD | {BOMB}) & set(seen)
    assert {path.split("/")[-1] for path in seen} == {f"{i:04d}.png" for i in range(12)}
    assert [(entry.path, entry.stage) for entry in data.skipped if entry.path == BOMB] == [(BOMB, "scan")]
    reported = {entry.path for entry in data.skipped if entry.path != BOMB}
    if on_demand:  # found when a batch first needed them: left out of that batch and of every later one
        assert reported <= BAD and reported
        assert all(entry.stage == "train" for entry in data.skipped if entry.path != BOMB)
    else:
        assert reported == BAD and all(entry.stage == "cache" for entry in data.skipped if entry.path != BOMB)
        assert (128 // 2, 32 // 2) not in shapes.assignment.buckets  # the emptied 4:1 bucket is gone
        assert all(shapes.assignment.plan(record).target_size[0] < 2 * shapes.assignment.plan(record).target_size[1]
                   for record in shapes.assignment.order.tolist())
    data.close()


def test_on_demand_training_completes_and_reports(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=_bad_dataset(tmp_path), max_train_steps=12,
                       disable_validation=True, vae_cache_ondemand=True)
    assert main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    report = [json.loads(line) for line in (tmp_path / "output" / "skipped.jsonl").read_text().splitlines()]
    assert report[0]["path"] == BOMB and report[0]["stage"] == "scan" and "decompression-bomb" in report[0]["reason"]
    assert report[1:] and {row["path"] for row in report[1:]} <= BAD
    assert all(row["stage"] == "train" and row["reason"] for row in report[1:])


# ---- corrupt cache entries ------------------------------------------------------------------------
def _latent_shards(root: Path) -> list[Path]:
    return sorted((root / "cache" / "vae" / "shapes" / "shards").glob("*.shard"))


def _flip_every_entry(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    for position in range(200, len(data), 256):
        data[position] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corrupt_latents_are_encoded_again(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=2, disable_validation=True)
    assert main(["cache", str(config)]) == 0
    for shard in _latent_shards(tmp_path):
        _flip_every_entry(shard)
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "encoding it again" in err and "cache verify --repair" in err
    assert "Traceback" not in err


def test_corrupt_latents_without_their_source_stop_the_run(tmp_path, tiny_model, capsys):
    dataset = write_dataset(tmp_path / "dataset", count=12)
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=dataset, max_train_steps=2,
                       disable_validation=True)
    assert main(["cache", str(config)]) == 0
    for shard in _latent_shards(tmp_path):
        _flip_every_entry(shard)
    for image in dataset.glob("*.png"):  # same size and time (so the same cache key), but no image any more
        stat = image.stat()
        image.write_bytes(b"\0" * stat.st_size)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is corrupt (checksum mismatch)" in lines[0], err
    assert "simpletuner cache verify --repair" in lines[0]


def test_cache_verify_repair_drops_corrupt_entries_and_the_next_run_encodes_them(tmp_path, tiny_model, capsys):
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1, disable_validation=True)
    assert main(["cache", str(config)]) == 0
    _flip_every_entry(_latent_shards(tmp_path)[0])
    capsys.readouterr()
    assert main(["cache", "verify", str(config)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert main(["cache", "verify", str(config), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "repaired: dropped" in out
    assert main(["cache", str(config)]) == 0
    out = capsys.readouterr().out
    assert "latents: 12 unique" in out and " 0 encoded" not in out.split("latents:")[1].splitlines()[0]
    assert main(["cache", "verify", str(config)]) == 0


# ---- disk full while writing the latent cache -----------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (tests/test_cache_store.py covers RLIMIT_FSIZE)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_while_caching_latents_is_one_line_and_a_rerun_resumes(tmp_path, tiny_model, tiny_disk, capsys):
    dataset = write_dataset(tmp_path / "dataset", count=12)
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=dataset, max_train_steps=1,
                       disable_validation=True)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0]["cache_dir_vae"] = str(tiny_disk / "vae")
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 60 * 1024)
    capsys.readouterr()
    assert main(["train", str(config), "--vae_batch_size", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run again" in lines[0], err
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
    filler.unlink()
    assert main(["cache", "verify", str(config)]) == 0  # what was committed is sound
    assert main(["train", str(config), "--vae_batch_size", "1"]) == 0
    assert "latents: 12 unique" in capsys.readouterr().out
    assert main(["cache", "verify", str(config)]) == 0
