"""Hugging Face datasets (type=huggingface) on datasets built locally: scan, captions, cache keys, training.

Every dataset here is written on this machine (save_to_disk, a parquet folder, an image folder);
nothing touches the Hub.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import metrics, write_run

from simpletuner.cli import main
from simpletuner.config.load import load_settings
from simpletuner.config.schema import DatasetConfig
from simpletuner.data.hf import HuggingFaceStorage
from simpletuner.demo.dataset import write_dataset
from simpletuner.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")

FEATURES = {"image": "Image", "text": "string"}


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _rows(folder: Path) -> dict[str, list]:
    """The demo dataset's images and captions as columns (image bytes, text)."""
    pngs = sorted(folder.glob("*.png"))
    return {"image": [{"bytes": p.read_bytes(), "path": None} for p in pngs],
            "text": [p.with_suffix(".txt").read_text().strip() for p in pngs]}


def _dataset(columns: dict[str, list]) -> "datasets.Dataset":
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(columns, features=features)


def _saved(tmp_path: Path, count: int = 12) -> Path:
    """A demo dataset saved with save_to_disk; returns its folder."""
    target = tmp_path / "hf-saved"
    _dataset(_rows(write_dataset(tmp_path / "pngs", count=count))).save_to_disk(str(target))
    return target


def _hf_entry(name: Path | str, **options) -> dict:
    return {"id": "shapes", "type": "huggingface", "dataset_name": str(name), "caption_column": "text",
            "resolution": 32, "resolution_type": "pixel_area", **options}


def _use_hf(config: Path, entry: dict) -> None:
    """Point the run written by `write_run` at a Hugging Face dataset instead of its image folder."""
    datasets_file = config.parent / "multidatabackend.json"
    entries = json.loads(datasets_file.read_text())
    datasets_file.write_text(json.dumps([entry, *entries[1:]]))


def _storage(entry: dict) -> HuggingFaceStorage:
    return HuggingFaceStorage.from_config(DatasetConfig(**entry))


# ----------------------------------------------------------------------------- configuration


def test_simpletuner_huggingface_entry_is_accepted_with_its_block(tmp_path: Path) -> None:
    config = {"model_family": "sd1x", "pretrained_model_name_or_path": "x", "data_backend_config": "data.json"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "data.json").write_text(json.dumps([
        {"id": "hf", "type": "huggingface", "dataset_name": "user/pictures", "metadata_backend": "huggingface",
         "huggingface": {"caption_column": ["short", "long"], "streaming": True}},
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]))
    dataset = load_settings(tmp_path / "config.json").datasets[0]
    assert dataset.type == "huggingface" and dataset.caption_strategy == "huggingface"
    assert dataset.location() == "user/pictures"
    from simpletuner.data.hf import HubSpec

    spec = HubSpec.from_config(dataset)
    assert (spec.split, spec.image_column, spec.caption_columns, spec.streaming) == ("train", "image",
                                                                                      ("short", "long"), True)


def test_huggingface_entry_needs_a_dataset_name_and_a_row_caption_strategy(tmp_path: Path) -> None:
    config = {"model_family": "sd1x", "pretrained_model_name_or_path": "x", "data_backend_config": "data.json"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "data.json").write_text(json.dumps([
        {"id": "a", "type": "huggingface"},
        {"id": "b", "type": "huggingface", "dataset_name": "u/n", "caption_strategy": "textfile"},
        {"id": "c", "instance_data_dir": str(tmp_path), "split": "train", "caption_column": "text"},
    ]))
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "config.json")
    message = str(caught.value)
    assert "dataset 'a': type 'huggingface' needs dataset_name" in message
    assert "type 'huggingface' takes caption_strategy 'huggingface' or 'instanceprompt', not 'textfile'" in message
    assert "dataset 'c': split, caption_column apply to type 'huggingface' only, and this entry has type 'local'" \
        in message


def test_filters_and_grid_images_of_the_block_are_refused_by_name(tmp_path: Path) -> None:
    config = {"model_family": "sd1x", "pretrained_model_name_or_path": "x", "data_backend_config": "data.json"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "data.json").write_text(json.dumps([
        {"id": "hf", "type": "huggingface", "dataset_name": "u/n", "huggingface": {"filter_func": {"min_width": 5}}},
    ]))
    with pytest.raises(ConfigError, match="dataset 'hf': huggingface.filter_func: filtering rows .* is not "
                                          "implemented in this version yet"):
        load_settings(tmp_path / "config.json")


# ----------------------------------------------------------------------------- reading rows


def test_rows_of_a_saved_dataset_read_as_files(tmp_path: Path) -> None:
    folder = _saved(tmp_path, count=3)
    storage = _storage(_hf_entry(folder))
    fingerprint = datasets.load_from_disk(str(folder))._fingerprint
    assert storage.url == f"hf-dataset:{folder}[train]@{fingerprint}"
    files = storage.list_files()
    assert [entry.path for entry in files] == ["row-000000", "row-000001", "row-000002"]
    first = sorted((tmp_path / "pngs").glob("*.png"))[0]
    assert files[0].size == first.stat().st_size and storage.read_bytes("row-000000") == first.read_bytes()
    assert storage.read_bytes("row-000000", 0, 8) == b"\x89PNG\r\n\x1a\n"
    assert storage.captions("row-000001") == [(tmp_path / "pngs" / "0001.txt").read_text().strip()]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("row-000003")


def test_row_names_sort_in_row_order() -> None:
    from simpletuner.data.hf import row_name, row_number

    assert row_name(7, 12) == "row-000007" and row_name(7, 2_000_000) == "row-0000007"
    names = [row_name(row, 1_000_001) for row in (999_999, 1_000_000, 3)]
    assert sorted(names) == [names[2], names[0], names[1]]
    assert [row_number(name) for name in names] == [999_999, 1_000_000, 3]
    with pytest.raises(FileNotFoundError):
        row_number("image-3.png")


def test_parquet_and_image_folders_load_through_load_dataset(tmp_path: Path) -> None:
    rows = _rows(write_dataset(tmp_path / "pngs", count=4))
    (tmp_path / "pq").mkdir()
    _dataset(rows).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    lines = []
    for i, (image, text) in enumerate(zip(rows["image"], rows["text"])):
        (folder / f"{i}.png").write_bytes(image["bytes"])
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    hf_cache = {"cache_dir": str(tmp_path / "hf-cache")}
    for source in (tmp_path / "pq", tmp_path / "imagefolder"):
        storage = _storage(_hf_entry(source, huggingface=hf_cache))
        assert [storage.read_bytes(f"row-{i:06d}") for i in range(4)] == [image["bytes"] for image in rows["image"]]
        assert [storage.captions(f"row-{i:06d}")[0] for i in range(4)] == rows["text"]
        assert [entry.size for entry in storage.list_files()] == [len(image["bytes"]) for image in rows["image"]]


def test_streaming_reads_in_order_and_restarts_only_to_go_back(tmp_path: Path) -> None:
    rows = _rows(write_dataset(tmp_path / "pngs", count=5))
    (tmp_path / "pq").mkdir()
    _dataset(rows).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    entry = _hf_entry(tmp_path / "pq", streaming=True, huggingface={"cache_dir": str(tmp_path / "hf-cache")})
    streamed, stored = _storage(entry), _storage({**entry, "streaming": False})
    assert streamed.sequential and streamed.read_workers == 1 and not stored.sequential
    assert streamed.url != stored.url  # separate cache entries for the two forms
    assert [e.size for e in streamed.list_files()] == [e.size for e in stored.list_files()]
    assert streamed.captions("row-000004") == [rows["text"][4]]
    assert [streamed.read_bytes(f"row-{i:06d}") for i in range(5)] == [r["bytes"] for r in rows["image"]]
    assert streamed._rows.restarts == 0
    assert streamed.read_bytes("row-000001") == rows["image"][1]["bytes"]  # kept among the recent rows
    assert streamed._rows.restarts == 0


def test_a_changed_dataset_gets_another_fingerprint(tmp_path: Path) -> None:
    rows = _rows(write_dataset(tmp_path / "pngs", count=3))
    _dataset(rows).save_to_disk(str(tmp_path / "one"))
    rows["text"][0] = "another caption"
    _dataset(rows).save_to_disk(str(tmp_path / "two"))
    assert _storage(_hf_entry(tmp_path / "one")).url.split("@")[1] != _storage(_hf_entry(tmp_path / "two")).url.split("@")[1]
    assert _storage(_hf_entry(tmp_path / "one")).url == _storage(_hf_entry(tmp_path / "one")).url


def test_a_missing_image_column_names_the_columns(tmp_path: Path) -> None:
    folder = _saved(tmp_path, count=2)
    with pytest.raises(DataError, match=r"has no column 'picture'; its columns are \['image', 'text'\]"):
        _storage(_hf_entry(folder, image_column="picture"))


def test_a_column_without_images_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, count=2)
    with pytest.raises(DataError, match=r"column 'text' of .* holds Value\('string'\), not images"):
        _storage(_hf_entry(folder, image_column="text"))


def test_a_binary_image_column_is_read_as_is(tmp_path: Path) -> None:
    images = [_png((8, 6), (200, 0, 0)), _png((6, 8), (0, 0, 200))]
    features = datasets.Features({"png": datasets.Value("binary"), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"png": images, "caption": ["red", "blue"]}, features=features).save_to_disk(
        str(tmp_path / "binary"))
    storage = _storage({"id": "b", "type": "huggingface", "dataset_name": str(tmp_path / "binary"),
                        "image_column": "png"})
    assert [storage.read_bytes(e.path) for e in storage.list_files()] == images
    assert storage.captions("row-000001") == ["blue"]  # caption_column defaults to "caption"


def test_an_unloadable_dataset_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset 'shapes': cannot load .*empty.*check dataset_name"):
        _storage(_hf_entry(tmp_path / "empty", huggingface={"cache_dir": str(tmp_path / "hf-cache")}))


# ----------------------------------------------------------------------------- scan and training


def _bad_rows(tmp_path: Path, parquet: bool = False) -> Path:
    rows = _rows(write_dataset(tmp_path / "pngs", count=6))
    rows["image"][2] = {"bytes": b"this is not an image", "path": None}
    rows["image"][4] = {"bytes": rows["image"][4]["bytes"][:-20], "path": None}  # cut short
    target = tmp_path / "hf-bad"
    if parquet:
        target.mkdir()
        _dataset(rows).to_parquet(str(target / "train-00000.parquet"))
    else:
        _dataset(rows).save_to_disk(str(target))
    return target


@pytest.mark.parametrize("form", ["saved", "streamed parquet"])
def test_scan_reports_bad_rows_by_row_name(tmp_path: Path, tiny_model, capsys, form: str) -> None:
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=2)
    streamed = form == "streamed parquet"
    extra = {"streaming": True, "huggingface": {"cache_dir": str(tmp_path / "hf-cache")}} if streamed else {}
    _use_hf(config, _hf_entry(_bad_rows(tmp_path, parquet=streamed), **extra))
    assert main(["scan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rows found:    6 (6 read" in out
    assert "skipped:       2" in out
    assert "row-000002: cannot identify image file" in out
    assert "row-000004" in out and "truncated" in out
    assert "usable images: 4" in out
    assert "captions:      huggingface; every usable image has one" in out
    assert main(["scan", str(config)]) == 0  # the index is reused: nothing read again
    assert "(0 read, 6 unchanged since the last scan)" in capsys.readouterr().out


def test_a_dataset_without_usable_rows_says_why(tmp_path: Path, tiny_model, capsys) -> None:
    rows = {"image": [{"bytes": b"garbage", "path": None}, {"bytes": b"", "path": None}], "text": ["a", "b"]}
    _dataset(rows).save_to_disk(str(tmp_path / "hf"))
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=2)
    _use_hf(config, _hf_entry(tmp_path / "hf"))
    assert main(["scan", str(config)]) == 2
    captured = capsys.readouterr()
    assert "1 undecodable (e.g. row-000000" in captured.out and "1 empty (0 bytes) (e.g. row-000001)" in captured.out
    assert "usable images: 0" in captured.out and "looked in" not in captured.err


def test_scan_reports_rows_without_caption(tmp_path: Path, tiny_model, capsys) -> None:
    rows = _rows(write_dataset(tmp_path / "pngs", count=4))
    rows["text"][1] = ""
    _dataset(rows).save_to_disk(str(tmp_path / "hf"))
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=2)
    _use_hf(config, _hf_entry(tmp_path / "hf"))
    assert main(["scan", str(config)]) == 2
    captured = capsys.readouterr()
    assert "1 image(s) without a caption" in captured.out
    assert "row-000001 has no caption (its row has no text in column 'text')" in captured.out + captured.err


@pytest.mark.slow
def test_training_on_a_saved_dataset_caches_by_fingerprint_and_resumes_exactly(tmp_path: Path, tiny_model,
                                                                               capsys) -> None:
    model, folder = tiny_model("sd1x"), _bad_rows(tmp_path)
    options = dict(disable_validation=True, max_train_steps=4, checkpointing_steps=2, caption_dropout_probability=0.3)
    straight = write_run(tmp_path / "straight", model, "sd1x", images=2, **options)
    _use_hf(straight, _hf_entry(folder))
    assert main(["train", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "latents: 4 unique, 0 already cached, 4 encoded" in out  # the 2 bad rows never reach the cache
    full = metrics(tmp_path / "straight" / "output")
    assert sorted(full) == [1, 2, 3, 4]

    resumed_root = tmp_path / "resumed"
    resumed = write_run(resumed_root, model, "sd1x", images=2, resume_from_checkpoint="latest",
                        cache_dir=str(tmp_path / "straight" / "cache"), **options)
    _use_hf(resumed, _hf_entry(folder))
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoints" / "step-000002",
                    resumed_root / "output" / "checkpoints" / "step-000002")
    assert main(["train", str(resumed)]) == 0
    assert "latents: 4 unique, 4 already cached, 0 encoded" in capsys.readouterr().out
    second_half = metrics(resumed_root / "output")
    assert sorted(second_half) == [3, 4]
    assert all(second_half[step] == full[step] for step in (3, 4)), (second_half, full)
    final_a = load_file(tmp_path / "straight" / "output" / "pytorch_lora_weights.safetensors")
    final_b = load_file(resumed_root / "output" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.slow
def test_training_on_a_streamed_parquet_folder(tmp_path: Path, tiny_model, capsys) -> None:
    rows = _rows(write_dataset(tmp_path / "pngs", count=6))
    (tmp_path / "pq").mkdir()
    _dataset(rows).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    entry = _hf_entry(tmp_path / "pq", streaming=True, huggingface={"cache_dir": str(tmp_path / "hf-cache")})
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=2, disable_validation=True, max_train_steps=2)
    _use_hf(config, entry)
    assert main(["train", str(config)]) == 0
    assert "latents: 6 unique, 0 already cached, 6 encoded" in capsys.readouterr().out
    assert sorted(metrics(tmp_path / "output")) == [1, 2]
    # encoding on demand reads rows in random order: refused for a stream
    assert main(["train", str(config), "--output_dir", str(tmp_path / "lazy"), "--vae_cache_ondemand", "true"]) == 2
    assert "is streamed" in capsys.readouterr().err
    # the same rows read from Arrow files are another source (another fingerprint): cached afresh
    _use_hf(config, {**entry, "streaming": False})
    assert main(["train", str(config), "--output_dir", str(tmp_path / "second")]) == 0
    assert "latents: 6 unique, 0 already cached, 6 encoded" in capsys.readouterr().out
