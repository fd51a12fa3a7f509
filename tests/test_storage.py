import io
import os
import socket

import pytest
from PIL import Image, features

from simpletuner.config.schema import DatasetConfig
from simpletuner.data.index import index_location
from simpletuner.data.storage import (DatasetStorage, FileEntry, RetryPolicy, WritableLocation, image_extensions,
                                      is_transient, read_url)
from simpletuner.errors import DataError


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(buffer, "JPEG")
    return buffer.getvalue()


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    _write(root / "a.jpg", _jpeg(16, 8))
    _write(root / "nested" / "deeper" / "B.JPG", _jpeg(8, 16))
    _write(root / "nested" / "c.png", b"not really a png")
    _write(root / "nested" / "c.txt", b"a caption")
    _write(root / "notes.md", b"# hi")
    return root


def test_image_extensions_follow_pillow():
    extensions = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"} <= extensions
    assert (".avif" in extensions) == (".avif" in Image.registered_extensions() and bool(features.check("avif")))
    assert (".jxl" in extensions) == (".jxl" in Image.registered_extensions())


def test_local_listing_is_recursive_filtered_and_carries_stat(tree):
    storage = DatasetStorage(str(tree))
    images = storage.list_images()
    assert [entry.path for entry in images] == ["a.jpg", "nested/c.png", "nested/deeper/B.JPG"]
    for entry in images:
        stat = os.stat(tree / entry.path)
        assert (entry.size, entry.mtime) == (stat.st_size, stat.st_mtime)
    assert [entry.path for entry in storage.list_files([".txt"])] == ["nested/c.txt"]
    assert len(storage.list_files()) == 5


def test_local_reads(tree):
    storage = DatasetStorage(str(tree))
    data = (tree / "a.jpg").read_bytes()
    assert storage.read_bytes("a.jpg") == data
    assert storage.read_bytes("a.jpg", 2, 10) == data[2:10]
    assert storage.read_text("nested/c.txt") == "a caption"
    assert storage.exists("nested/c.txt") and not storage.exists("nested/zzz.txt")
    assert storage.open_image("nested/deeper/B.JPG").size == (8, 16)
    with storage.open("a.jpg") as handle:
        assert handle.read() == data
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.jpg")


def test_a_missing_dataset_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DatasetStorage(str(tmp_path / "nope"))


def test_dataset_storage_has_no_way_to_write():
    public = {name for name in dir(DatasetStorage) if not name.startswith("_")}
    for verb in ("write", "put", "pipe", "rm", "delete", "remove", "move", "mv", "rename", "mkdir", "touch", "copy"):
        assert not any(verb in name for name in public), (verb, public)


def test_writable_location_writes_atomically(tmp_path):
    location = WritableLocation(str(tmp_path / "cache" / "x"))
    location.write_bytes("sub/file.bin", b"one")
    location.write_bytes("sub/file.bin", b"two")
    assert location.read_bytes("sub/file.bin") == b"two"
    assert os.listdir(tmp_path / "cache" / "x" / "sub") == ["file.bin"]  # no temporary left behind
    assert location.exists("sub/file.bin") and not location.exists("other")


def test_cache_inside_the_dataset_is_refused(tree, tmp_path):
    inside = DatasetConfig(id="d", instance_data_dir=str(tree), cache_dir=str(tree / "cache"))
    with pytest.raises(DataError, match="inside the dataset"):
        index_location(inside, str(tmp_path / "cache"))
    outside = DatasetConfig(id="d", instance_data_dir=str(tree))
    assert index_location(outside, str(tmp_path / "cache")).url == str(tmp_path / "cache" / "index" / "d")


# --------------------------------------------------------------------------- S3 (moto server on 127.0.0.1)


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.make_bucket("storage-tests")
    s3_server.put("storage-tests", {
        "set/a.jpg": _jpeg(32, 16),
        "set/sub/b.PNG": b"png-ish",
        "set/sub/b.txt": b"caption b",
        "set/readme.md": b"#",
        "other/c.jpg": _jpeg(4, 4),
    })
    return "storage-tests"


def test_s3_listing_reading_and_images(s3_server, bucket):
    dataset = DatasetConfig(id="s3", **s3_server.dataset_fields(bucket, "set"))
    storage = DatasetStorage.from_config(dataset)
    images = storage.list_images()
    assert [entry.path for entry in images] == ["a.jpg", "sub/b.PNG"]
    assert images[0].size == len(_jpeg(32, 16)) and images[0].mtime > 1e9
    assert storage.read_bytes("a.jpg") == _jpeg(32, 16)
    assert storage.read_bytes("a.jpg", 0, 4) == _jpeg(32, 16)[:4]
    assert storage.read_text("sub/b.txt") == "caption b"
    assert storage.open_image("a.jpg").size == (32, 16)
    with storage.open("a.jpg", size=images[0].size) as handle:
        assert handle.read(2) == b"\xff\xd8"
    assert storage.exists("sub/b.txt") and not storage.exists("sub/zzz.txt")


def test_s3_missing_object_is_not_retried(s3_server, bucket):
    sleeps: list[float] = []
    dataset = DatasetConfig(id="s3", **s3_server.dataset_fields(bucket, "set"))
    storage = DatasetStorage.from_config(dataset, retry=RetryPolicy(attempts=4, sleep=sleeps.append))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.jpg")
    assert sleeps == []


def test_s3_credentials_and_endpoint_from_the_environment(s3_server, bucket, monkeypatch):
    fields = s3_server.dataset_fields(bucket, "set")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fields["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fields["aws_secret_access_key"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", fields["aws_endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", fields["aws_region_name"])
    dataset = DatasetConfig(id="env", type="aws", aws_bucket_name=bucket, aws_data_prefix="other")
    assert [entry.path for entry in DatasetStorage.from_config(dataset).list_images()] == ["c.jpg"]


def test_s3_writable_location_and_read_url(s3_server, bucket):
    dataset = DatasetConfig(id="s3", **s3_server.dataset_fields(bucket, "set"))
    cache = WritableLocation(f"s3://{bucket}/caches/s3", dataset)
    cache.write_bytes("index.bin", b"payload")
    assert cache.read_bytes("index.bin") == b"payload"
    assert read_url(f"s3://{bucket}/caches/s3/index.bin", dataset) == b"payload"
    assert WritableLocation(f"s3://{bucket}/set/cache", dataset).inside(dataset.location())
    assert not cache.inside(dataset.location())


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connection_errors_are_retried_with_backoff(s3_server):
    fields = s3_server.dataset_fields("nobody-home")
    fields["aws_endpoint_url"] = f"http://127.0.0.1:{_closed_port()}"
    sleeps: list[float] = []
    storage = DatasetStorage.from_config(DatasetConfig(id="down", **fields),
                                         retry=RetryPolicy(attempts=3, base_delay=0.01, sleep=sleeps.append))
    with pytest.raises(Exception) as raised:
        storage.list_images()
    assert is_transient(raised.value)
    assert len(sleeps) == 2 and all(0 <= delay <= 0.02 for delay in sleeps)


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize(("code", "status", "transient"), [
    ("SlowDown", 503, True), ("InternalError", 500, True), ("ThrottlingException", 400, True),
    ("NoSuchKey", 404, False), ("AccessDenied", 403, False), ("InvalidArgument", 400, False),
])
def test_transient_classification_of_s3_errors(code, status, transient):
    from s3fs.errors import translate_boto_error

    error = _client_error(code, status)
    assert is_transient(error) is transient
    assert is_transient(translate_boto_error(error)) is transient  # as s3fs raises it


def test_retry_policy_gives_up_on_permanent_errors_and_succeeds_after_transient_ones():
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=5, base_delay=0.1, sleep=sleeps.append)
    outcomes = iter([ConnectionResetError("reset"), _client_error("SlowDown", 503), "done"])

    def flaky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert policy.call(flaky, "test") == "done"
    assert len(sleeps) == 2 and sleeps[0] <= 0.1 and sleeps[1] <= 0.2
    with pytest.raises(PermissionError):
        policy.call(lambda: (_ for _ in ()).throw(PermissionError("denied")), "test")
    assert len(sleeps) == 2


def test_file_entry_is_plain_data():
    assert FileEntry("a.jpg", 3, 1.5) == FileEntry("a.jpg", 3, 1.5)


def test_s3_missing_bucket_is_a_data_error(s3_server):
    dataset = DatasetConfig(id="s3", **s3_server.dataset_fields("no-such-bucket", "x"))
    with pytest.raises(DataError, match=r"cannot list s3://no-such-bucket/x .*check aws_bucket_name"):
        DatasetStorage.from_config(dataset).list_images()


def test_s3_without_credentials_is_a_data_error(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fields = s3_server.dataset_fields("storage-tests", "set")
    del fields["aws_access_key_id"], fields["aws_secret_access_key"]
    with pytest.raises(DataError, match=r"cannot list s3://storage-tests/set \(NoCredentialsError"):
        DatasetStorage.from_config(DatasetConfig(id="anon", **fields)).list_images()


# ---- text that is not UTF-8 -------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, raw, text", [
    ("cp1252", "a café – “quoted”".encode("cp1252"), "a café – “quoted”"),
    ("latin-1", b"caf\xe9 \x81\x8d", "café \x81\x8d"),  # 0x81 and 0x8d are undefined in cp1252
])
def test_text_that_is_not_utf8_falls_back_with_a_warning_naming_the_file(tmp_path, caplog, encoding, raw, text):
    (tmp_path / "a.txt").write_bytes(raw)
    storage = DatasetStorage(str(tmp_path))
    with caplog.at_level("WARNING"):
        assert storage.read_text("a.txt") == text
    assert f"{tmp_path}/a.txt is not UTF-8" in caplog.text and f"read it as {encoding}" in caplog.text


def test_utf8_text_reads_without_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes("\ufeffcafé ✓".encode("utf-8"))
    with caplog.at_level("WARNING"):
        assert DatasetStorage(str(tmp_path)).read_text("a.txt") == "café ✓"
    assert not caplog.text


def test_a_self_referential_symlink_is_listed_not_raised(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("loop-dir", tmp_path / "loop-dir")
    listing = DatasetStorage(str(tmp_path)).list_images()
    assert [(entry.path, entry.size) for entry in listing] == [("loop.png", -1), ("ok.png", 1)]
