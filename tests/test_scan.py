import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simpletuner.cli import main
from simpletuner.config.schema import DatasetConfig
from simpletuner.data.pairing import DatasetLink, find_links, pair_by_path, regularisation_datasets
from simpletuner.errors import ConfigError


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _config(tmp_path, datasets: str, **options) -> str:
    lines = ['model_family = "sdxl"', 'pretrained_model_name_or_path = "stabilityai/sdxl-base"',
             "resolution = 256", "minimum_image_size = 128", f'cache_dir = "{tmp_path / "cache"}"']
    lines += [f"{key} = {value}" for key, value in options.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n" + datasets)
    return str(path)


@pytest.fixture
def pets(tmp_path):
    root = tmp_path / "pets"
    for i in range(4):
        _put(root / f"square/cat_{i}.jpg", _jpeg(256, 256))
        _put(root / f"wide/dog_{i}.jpg", _jpeg(384, 256))
        _put(root / f"wide/dog_{i}.txt", f"a dog number {i}".encode())
    _put(root / "tiny/mouse.jpg", _jpeg(40, 40))
    _put(root / "broken/half.jpg", _jpeg(300, 300)[:400])
    _put(root / "broken/empty.jpg", b"")
    _put(root / "notes.md", b"# notes")
    return root


def _tree_fingerprint(root) -> str:
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        stat = os.stat(folder)
        digest.update(f"D {os.path.relpath(folder, root)} {stat.st_mtime_ns} {stat.st_mode}".encode())
        for name in sorted(files):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest.update(f"F {os.path.relpath(path, root)} {stat.st_size} {stat.st_mtime_ns} {stat.st_mode}".encode())
            digest.update(hashlib.sha256(open(path, "rb").read()).digest())
    return digest.hexdigest()


def test_scan_prints_files_skips_and_buckets(tmp_path, pets, capsys):
    config = _config(tmp_path, f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\n', train_batch_size=2)
    assert main(["scan", config]) == 0
    out = capsys.readouterr().out
    assert f"dataset 'pets' ({pets})" in out
    assert "files found:   11 images (11 read, 0 unchanged since the last scan); other files: 4 .txt, 1 .md" in out
    assert "skipped:       3" in out
    assert "1 empty (0 bytes) (e.g. broken/empty.jpg)" in out
    assert "1 truncated (e.g. broken/half.jpg: " in out
    assert "1 too small (e.g. tiny/mouse.jpg: too small: 40x40" in out
    assert "usable images: 8" in out
    assert "captions:      filename; every usable image has one" in out
    table = out[out.index("buckets:"):]
    assert "2 (batch size 2)" in table
    assert "256x256         4         2" in table
    assert "320x192         4         2" in table or "320x208         4         2" in table

    assert main(["scan", config, "--train_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "(0 read, 11 unchanged since the last scan)" in out
    assert "256x256         4         1" in out


def test_scan_leaves_the_dataset_exactly_as_it_was(tmp_path, pets, capsys):
    before = _tree_fingerprint(pets)
    config = _config(tmp_path, f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\n')
    assert main(["scan", config]) == 0
    assert main(["scan", config]) == 0
    assert _tree_fingerprint(pets) == before
    assert (tmp_path / "cache" / "index" / "pets" / "image_index.npz").exists()


def test_no_usable_image_stops_with_every_reason_and_exit_2(tmp_path):
    root = tmp_path / "bad"
    _put(root / "empty.jpg", b"")
    _put(root / "noise.png", os.urandom(300))
    _put(root / "small.jpg", _jpeg(32, 32))
    _put(root / "cut.jpg", _jpeg(200, 200)[:300])
    config = _config(tmp_path, f'[[datasets]]\nid = "bad"\ninstance_data_dir = "{root}"\n')
    done = subprocess.run([sys.executable, "-m", "simpletuner", "scan", config], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "dataset 'bad': no usable image; 4 file(s) found, every one excluded:" in done.stderr
    for line in ("1 empty (0 bytes)", "1 undecodable (e.g. noise.png", "1 truncated (e.g. cut.jpg",
                 "1 too small (e.g. small.jpg"):
        assert line in done.stderr
    assert "lower minimum_image_size" in done.stderr


def test_a_location_without_images_says_what_it_holds(tmp_path, capsys):
    root = tmp_path / "texts"
    _put(root / "a.gif", b"GIF89a")
    _put(root / "b.txt", b"text")
    config = _config(tmp_path, f'[[datasets]]\nid = "texts"\ninstance_data_dir = "{root}"\n')
    assert main(["scan", config]) == 2
    err = capsys.readouterr().err
    assert "no image files were found" in err
    assert f"looked in {root} for " in err and ".bmp, .jpeg, .jpg, .png" in err and "other files: 1 .gif, 1 .txt" in err


def test_missing_textfile_captions_are_reported(tmp_path, pets, capsys):
    entry = f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\ncaption_strategy = "textfile"\n'
    config = _config(tmp_path, entry)
    assert main(["scan", config]) == 2
    captured = capsys.readouterr()
    assert "captions:      textfile; 4 image(s) without a caption" in captured.out
    assert "square/cat_0.jpg: no .txt beside it" in captured.out
    assert "dataset 'pets': 4 image(s) have no caption" in captured.err
    config = _config(tmp_path, entry + 'missing_caption = "filename"\n')
    assert main(["scan", config]) == 0
    assert "(their file name is used)" in capsys.readouterr().out


def test_scan_of_an_s3_dataset(tmp_path, s3_server, capsys):
    s3_server.make_bucket("scan-tests")
    s3_server.put("scan-tests", {f"train/{i}.jpg": _jpeg(256, 256) for i in range(3)} | {"train/z.jpg": b""})
    fields = s3_server.dataset_fields("scan-tests", "train")
    entry = "[[datasets]]\nid = \"remote\"\n" + "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    config = _config(tmp_path, entry)
    assert main(["scan", config]) == 0
    out = capsys.readouterr().out
    assert "dataset 'remote' (s3://scan-tests/train)" in out
    assert "files found:   4 images (4 read" in out and "usable images: 3" in out
    assert "256x256         3         3" in out
    assert main(["scan", config]) == 0
    assert "(0 read, 4 unchanged" in capsys.readouterr().out


def test_conditioning_pairs_are_reported(tmp_path, pets, capsys):
    masks = tmp_path / "masks"
    for i in range(3):
        _put(masks / f"square/cat_{i}.png", _jpeg(256, 256))
    _put(masks / "orphan.png", _jpeg(256, 256))
    entries = (f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\nconditioning_data = "masks"\n'
               f'[[datasets]]\nid = "masks"\ninstance_data_dir = "{masks}"\ndataset_type = "conditioning"\n'
               'conditioning_type = "mask"\n')
    assert main(["scan", _config(tmp_path, entries)]) == 0
    out = capsys.readouterr().out
    assert "pets <-> masks (conditioning): 3 pairs" in out
    assert "5 images without a partner, e.g. square/cat_3.jpg, wide/dog_0.jpg, wide/dog_1.jpg" in out
    assert "1 masks files without an image, e.g. orphan.png" in out


def test_pair_by_path_ignores_extensions():
    pairing = pair_by_path(["a/1.jpg", "a/2.jpg", "b/3.png"], ["a/1.png", "a/2.webp", "a/2.png", "c/9.png"])
    assert pairing.pairs == {"a/1.jpg": "a/1.png", "a/2.jpg": "a/2.png"}
    assert pairing.unpaired_images == ["b/3.png"]
    assert pairing.unpaired_partners == ["c/9.png"]
    assert pairing.ambiguous == ["a/2"]
    assert "1 images without a partner, e.g. b/3.png" in pairing.report(DatasetLink("x", "y"))


def test_find_links_checks_partners():
    image = DatasetConfig(id="img", instance_data_dir="/d", conditioning_data="cond")
    regularisation = DatasetConfig(id="reg", instance_data_dir="/r", is_regularisation_data=True,
                                   conditioning_data="cond")
    conditioning = DatasetConfig(id="cond", instance_data_dir="/c", dataset_type="conditioning")
    links = find_links([image, regularisation, conditioning])
    assert links == [DatasetLink("img", "cond"), DatasetLink("reg", "cond", regularisation=True)]
    assert links[1].kind == "regularisation conditioning"
    assert regularisation_datasets([image, regularisation, conditioning]) == ["reg"]
    with pytest.raises(ConfigError, match="names no enabled dataset"):
        find_links([image])
    with pytest.raises(ConfigError, match="must name a dataset with dataset_type='conditioning'"):
        find_links([DatasetConfig(id="a", instance_data_dir="/a", conditioning_data="b"),
                    DatasetConfig(id="b", instance_data_dir="/b")])


# ---- sources that cannot be read as they are ------------------------------------------------------
def test_a_self_referential_symlink_is_a_skipped_entry_with_its_reason(tmp_path, pets, capsys):
    os.symlink("loop.jpg", pets / "loop.jpg")
    config = _config(tmp_path, f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\n')
    assert main(["scan", config]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "unreadable" in line)
    assert "loop.jpg" in line and "symbolic links" in line


def test_a_tiny_image_is_named_as_enlarged_or_skipped_by_minimum_image_size(tmp_path, pets, capsys):
    _put(pets / "dot.jpg", _jpeg(1, 1))
    entry = f'[[datasets]]\nid = "pets"\ninstance_data_dir = "{pets}"\n'
    unset = open(_config(tmp_path, entry)).read().replace("minimum_image_size = 128\n", "")
    (tmp_path / "unset.toml").write_text(unset)
    assert main(["scan", str(tmp_path / "unset.toml")]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "enlarged more than 2x" in out and "dot.jpg: 1x1 -> 256x256" in out
    assert main(["scan", _config(tmp_path, entry)]) == 0  # minimum_image_size = 128: it is skipped instead
    out = capsys.readouterr().out
    assert "too small (e.g." in out and "dot.jpg" in out and "enlarged" not in out


def test_when_no_image_is_usable_the_skipped_section_says_why(tmp_path):
    # Every image is read fine by the index but too small for the plan: the report must not say "skipped: none".
    root = tmp_path / "small"
    _put(root / "a.jpg", _jpeg(64, 64))
    _put(root / "b.jpg", _jpeg(80, 64))
    config = _config(tmp_path, f'[[datasets]]\nid = "small"\ninstance_data_dir = "{root}"\n')
    done = subprocess.run([sys.executable, "-m", "simpletuner", "scan", config], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "skipped:       none" not in done.stdout
    assert "skipped:       2" in done.stdout and "2 too small (e.g. a.jpg" in done.stdout
    assert "usable images: 0" in done.stdout
