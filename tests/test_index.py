import io
import os

import numpy as np
import pytest
from PIL import Image

from simpletuner.config.schema import DatasetConfig
from simpletuner.data.index import (INDEX_FILE, OK, TRUNCATED, ImageIndex, PathTable, load_index, read_header,
                                    scan_dataset, skipped_groups, update_index)
from simpletuner.data.storage import DatasetStorage, FileEntry, WritableLocation


def _image(width: int, height: int, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(width * 7 + height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _put(root, relative: str, data: bytes):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "images"
    _put(root, "ok/photo.jpg", _image(40, 30, "JPEG"))
    _put(root, "ok/drawing.png", _image(20, 50, "PNG"))
    _put(root, "ok/web.webp", _image(33, 17, "WEBP"))
    _put(root, "ok/bitmap.bmp", _image(12, 9, "BMP"))
    _put(root, "ok/scan.tiff", _image(21, 22, "TIFF"))
    _put(root, "ok/rotated.jpg", _image(64, 32, "JPEG", exif=_exif(6)))  # shown as 32x64
    _put(root, "ok/upside_down.jpg", _image(64, 32, "JPEG", exif=_exif(3)))  # stays 64x32
    _put(root, "ok/transposed.webp", _image(30, 10, "WEBP", exif=_exif(5)))
    _put(root, "ok/png_named.jpg", _image(15, 16, "PNG"))  # the extension lies; the header decides
    _put(root, "ok/big_header.jpg", _image(24, 12, "JPEG", icc_profile=os.urandom(150_000)))
    _put(root, "bad/empty.jpg", b"")
    _put(root, "bad/noise.jpg", os.urandom(2000))
    _put(root, "bad/text.png", b"just some text, no image at all")
    jpeg = _image(80, 60, "JPEG")
    _put(root, "bad/half.jpg", jpeg[: len(jpeg) // 2])
    _put(root, "bad/header_only.jpg", jpeg[:300])
    png = _image(60, 60, "PNG")
    _put(root, "bad/half.png", png[: len(png) // 2])
    webp = _image(60, 40, "WEBP")
    _put(root, "bad/half.webp", webp[: len(webp) // 2])
    (root / "bad" / "dangling.jpg").symlink_to(root / "bad" / "gone.jpg")
    return root


def _scan(root, cache_dir):
    return scan_dataset(DatasetStorage(str(root)), WritableLocation(str(cache_dir)))


def test_sizes_come_from_headers_with_exif_orientation(dataset, tmp_path):
    result = _scan(dataset, tmp_path / "cache")
    sizes = {record.path: (record.width, record.height) for record in result.index.records()}
    assert sizes == {
        "ok/photo.jpg": (40, 30), "ok/drawing.png": (20, 50), "ok/web.webp": (33, 17), "ok/bitmap.bmp": (12, 9),
        "ok/scan.tiff": (21, 22), "ok/rotated.jpg": (32, 64), "ok/upside_down.jpg": (64, 32),
        "ok/transposed.webp": (10, 30), "ok/png_named.jpg": (15, 16), "ok/big_header.jpg": (24, 12),
    }
    record = next(r for r in result.index.records() if r.path == "ok/photo.jpg")
    stat = os.stat(dataset / "ok/photo.jpg")
    assert (record.file_size, record.mtime) == (stat.st_size, stat.st_mtime)


def test_every_skip_reason_is_recorded_with_examples(dataset, tmp_path):
    result = _scan(dataset, tmp_path / "cache")
    groups = {group.reason: group for group in skipped_groups(result.index, examples=5)}
    paths = {reason: sorted(example.split(": ")[0] for example in group.examples) for reason, group in groups.items()}
    assert paths == {
        "zero_byte": ["bad/empty.jpg"],
        "unreadable": ["bad/dangling.jpg"],
        "undecodable": ["bad/noise.jpg", "bad/text.png"],
        "truncated": ["bad/half.jpg", "bad/half.png", "bad/half.webp", "bad/header_only.jpg"],
    }
    assert result.files_found == 18 and int(result.index.usable.sum()) == 10
    assert any("No such file" in example for example in groups["unreadable"].examples)
    assert any("end-of-image" in example for example in groups["truncated"].examples)


def test_index_lives_in_the_cache_and_rescans_reopen_nothing(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = _scan(dataset, cache)
    assert os.listdir(cache) == [INDEX_FILE]
    assert not any(INDEX_FILE in files for _, _, files in os.walk(dataset))
    assert first.read == 18 and first.reused == 0

    second = _scan(dataset, cache)
    # only the unreadable entry (an I/O error may pass) is tried again
    assert (second.read, second.reused, second.removed) == (1, 17, 0)

    # same size and mtime, garbage content: an unchanged file is not reopened, so its row stays as it was
    photo = dataset / "ok/photo.jpg"
    stat = os.stat(photo)
    photo.write_bytes(os.urandom(stat.st_size))
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = _scan(dataset, cache)
    assert third.read == 1
    assert ("ok/photo.jpg", 40, 30) in [(r.path, r.width, r.height) for r in third.index.records()]

    # changed (new mtime), new and deleted files
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _put(dataset, "new/fresh.png", _image(9, 9, "PNG"))
    (dataset / "ok/web.webp").unlink()
    fourth = _scan(dataset, cache)
    assert (fourth.read, fourth.removed, fourth.files_found) == (3, 1, 18)
    groups = {group.reason: group.count for group in skipped_groups(fourth.index)}
    assert groups["undecodable"] == 3  # the garbage photo, now that it changed
    assert "new/fresh.png" in [r.path for r in fourth.index.records()]
    assert "ok/web.webp" not in list(fourth.index.paths)


def test_a_file_vanishing_between_listing_and_reading_is_unreadable(tmp_path):
    root = tmp_path / "d"
    _put(root, "a.jpg", _image(8, 8, "JPEG"))
    storage = DatasetStorage(str(root))
    listing = storage.list_images()
    (root / "a.jpg").unlink()
    result = update_index(storage, listing, None)
    assert [g.reason for g in skipped_groups(result.index)] == ["unreadable"]


def test_index_round_trip_and_foreign_index_is_ignored(dataset, tmp_path):
    cache = WritableLocation(str(tmp_path / "cache"))
    index = scan_dataset(DatasetStorage(str(dataset)), cache).index
    loaded = load_index(cache, str(dataset))
    assert loaded is not None
    assert list(loaded.paths) == list(index.paths)
    for column in ("file_size", "mtime", "width", "height", "status"):
        assert np.array_equal(getattr(loaded, column), getattr(index, column))
    assert loaded.details == index.details
    assert load_index(cache, str(tmp_path / "elsewhere")) is None
    cache.write_bytes(INDEX_FILE, b"corrupt")
    assert load_index(cache, str(dataset)) is None


def test_path_table_is_compact_and_exact():
    paths = [f"folder {i % 7}/ünïcode_{i}.jpg" for i in range(1000)]
    table = PathTable.from_paths(paths)
    assert list(table) == paths and table[999] == paths[999] and table[3:5] == paths[3:5]
    assert table.nbytes == sum(len(p.encode()) + 1 for p in paths) + 8 * (len(paths) + 1)  # bytes + offsets
    empty = ImageIndex.empty("x")
    assert len(empty) == 0 and list(empty.paths) == [] and empty.records() == []


def test_read_header_on_a_big_file_reads_only_head_and_tail(tmp_path):
    root = tmp_path / "d"
    data = _image(900, 700, "PNG")
    assert len(data) > 500_000
    _put(root, "big.png", data)
    storage = DatasetStorage(str(root))
    result = read_header(storage, storage.list_images()[0])
    assert (result.width, result.height, result.detail) == (900, 700, "")


def test_s3_dataset_scans_into_an_s3_cache(s3_server):
    s3_server.make_bucket("index-tests")
    s3_server.put("index-tests", {
        "imgs/a.jpg": _image(40, 20, "JPEG"),
        "imgs/sub/b.png": _image(10, 30, "PNG"),
        "imgs/sub/big.jpg": _image(24, 12, "JPEG", icc_profile=os.urandom(150_000)),
        "imgs/rotated.jpg": _image(64, 32, "JPEG", exif=_exif(8)),
        "imgs/empty.jpg": b"",
        "imgs/noise.webp": os.urandom(500),
    })
    dataset = DatasetConfig(id="s3", **s3_server.dataset_fields("index-tests", "imgs"))
    storage = DatasetStorage.from_config(dataset)
    cache = WritableLocation("s3://index-tests/cache/s3", dataset)
    first = scan_dataset(storage, cache)
    sizes = {r.path: (r.width, r.height) for r in first.index.records()}
    assert sizes == {"a.jpg": (40, 20), "sub/b.png": (10, 30), "sub/big.jpg": (24, 12), "rotated.jpg": (32, 64)}
    assert sorted(g.reason for g in skipped_groups(first.index)) == ["undecodable", "zero_byte"]
    second = scan_dataset(storage, cache)
    assert (second.read, second.reused) == (0, 6)


def test_listing_passed_in_is_used_as_is(dataset, tmp_path):
    storage = DatasetStorage(str(dataset))
    listing = [entry for entry in storage.list_images() if entry.path.startswith("ok/")]
    result = scan_dataset(storage, WritableLocation(str(tmp_path / "c")), listing=listing)
    assert result.files_found == 10 and result.index.usable.all()
    assert isinstance(listing[0], FileEntry)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("fmt", "save"), [("JPEG", {}), ("JPEG", {"progressive": True, "icc_profile": b"i" * 3000}),
                                           ("PNG", {}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_header_size_matches_pillow_after_exif_transpose(tmp_path, fmt, save, orientation):
    from PIL import ImageOps

    data = _image(37, 21, fmt, exif=_exif(orientation), **save)
    path = _put(tmp_path / "d", f"image.{fmt.lower()}", data)
    storage = DatasetStorage(str(path.parent))
    result = read_header(storage, storage.list_images()[0])
    assert (result.width, result.height) == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
    assert result.status == OK, result.detail


def test_phone_trailers_after_a_jpeg_are_not_truncation(tmp_path):
    photo = _image(40, 30, "JPEG")
    root = tmp_path / "d"
    _put(root, "samsung.jpg", photo + os.urandom(10_000) + b"\x00\x00SEFT")
    xmp = b"\xff\xe1" + (len(b"http://ns.adobe.com/xap/1.0/\0<x GCamera:MotionPhoto='1'/>") + 2).to_bytes(2, "big")
    motion = photo[:2] + xmp + b"http://ns.adobe.com/xap/1.0/\0<x GCamera:MotionPhoto='1'/>" + photo[2:]
    _put(root, "motion.jpg", motion + os.urandom(20_000))  # the appended video
    _put(root, "cut.jpg", photo + os.urandom(10_000))  # no declaration: judged truncated
    _put(root, "garbage_after.png", _image(9, 9, "PNG") + b"\0" * 100)
    storage = DatasetStorage(str(root))
    results = {entry.path: read_header(storage, entry) for entry in storage.list_images()}
    assert {path: result.status for path, result in results.items()} == {
        "samsung.jpg": OK, "motion.jpg": OK, "cut.jpg": TRUNCATED, "garbage_after.png": OK}
    assert (results["motion.jpg"].width, results["motion.jpg"].height) == (40, 30)


def test_a_full_disk_while_saving_the_index_is_one_line(tmp_path):
    """A 64 KiB tmpfs, nearly full (where mounting is permitted): DataError, nothing half-written."""
    import subprocess

    from simpletuner.data.index import save_index
    from simpletuner.errors import DataError

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (disk / "filler").write_bytes(b"\0" * 60 * 1024)
        n = 20_000  # about 0.5 MB of columns and paths: more than the disk has left
        index = ImageIndex("somewhere", PathTable.from_paths([f"folder/image-{i:06d}.png" for i in range(n)]),
                           np.arange(n, dtype=np.int64), np.zeros(n), np.full(n, 64, np.int32),
                           np.full(n, 64, np.int32), np.zeros(n, np.uint8))
        with pytest.raises(DataError, match="No space left on device"):
            save_index(WritableLocation(str(disk / "index")), index)
        assert os.listdir(disk / "index") == []  # the temporary file is gone
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_image_over_the_decompression_bomb_limit_is_undecodable_from_its_header(tmp_path):
    from bad_inputs import bomb_png

    from simpletuner.data.index import UNDECODABLE, skipped_rows

    bomb_png(tmp_path / "bomb.png")
    storage = DatasetStorage(str(tmp_path))
    (entry,) = storage.list_images()
    result = read_header(storage, entry)
    assert result.status == UNDECODABLE and (result.width, result.height) == (30000, 30000)
    assert "900,000,000 pixels" in result.detail and "MAX_IMAGE_PIXELS" in result.detail
    with pytest.raises(Image.DecompressionBombError):  # what Pillow would do when caching it
        Image.open(tmp_path / "bomb.png")
    index = ImageIndex("x", PathTable.from_paths(["bomb.png", "ok.png"]), np.zeros(2, np.int64), np.zeros(2),
                       np.zeros(2, np.int32), np.zeros(2, np.int32), np.array([UNDECODABLE, OK], np.uint8),
                       {0: result.detail})
    assert list(skipped_rows(index)) == [("bomb.png", f"undecodable: {result.detail}")]
